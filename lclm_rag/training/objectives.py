"""What a training step minimises: teacher-forced loss on targets after latent prompts, or, in the
alignment stage, the projector's distance to the decoder's own embeddings of each latent's tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lclm_rag.decoder import LatentDecoder, cache_argument
from lclm_rag.errors import ConfigError
from lclm_rag.model import LatentContextModel
from lclm_rag.prompt import Segment
from lclm_rag.training.examples import Example


def teacher_forced_batch(model: LatentContextModel, examples: list[Example], latents: list[torch.Tensor],
                         per_token: bool = False, unpadded: bool = False,
                         reference: Sequence[torch.Tensor | None] | None = None, kl_weight: float = 0.0):
    """Loss (mean over examples of the per-token loss on the target), correct and total target tokens.

    ``latents`` holds the examples' passages in order, ``len(ex.passages)`` per example.
    ``unpadded``: the same numbers from ``unpadded_teacher_forced`` (less work per step), which
    also adds the KL to a text reader's ``reference`` (a stage's ``text_kl``).
    """
    slots, cursor = [], 0
    for ex in examples:
        slots.append(latents[cursor : cursor + len(ex.passages)])
        cursor += len(ex.passages)
    targets = [ex.target for ex in examples]
    messages = [ex.user_message for ex in examples]
    if kl_weight and (not unpadded or per_token):
        raise ConfigError("the KL to a text reader is computed by the unpadded step only")
    if not unpadded or per_token:
        return model.teacher_forced(messages, slots, targets, per_token)
    dec = model.decoder
    return unpadded_teacher_forced(dec, [dec.segments(m, s) for m, s in zip(messages, slots)], targets, reference, kl_weight)


def shared_prefix_length(embedded: Sequence[torch.Tensor], start: int = 0, limit: int | None = None) -> int:
    """Positions from ``start`` on where every embedded prompt is the same (compared as tensors), up to ``limit``."""
    limit = min(len(e) for e in embedded) if limit is None else limit
    first, length = embedded[0], max(0, limit - start)
    for other in embedded[1:]:
        if length == 0:
            break
        differs = (other[start : start + length] != first[start : start + length]).any(-1).nonzero()
        if len(differs):
            length = int(differs[0])
    return start + length


def unpadded_teacher_forced(decoder: LatentDecoder, prompts: Sequence[Sequence[Segment]], targets: Sequence[str],
                            reference: Sequence[torch.Tensor | None] | None = None, kl_weight: float = 0.0):
    """``LatentDecoder.teacher_forced``'s loss, hits and count, without padding and without running a
    position twice that several prompts share.

    A padded batch that mixes a 60-position restoration prompt with 350-position QA prompts is ~40%
    padding; every prompt opens with the same 25-45 template positions (system turn, instruction);
    and questions asked over the same passages (a stage's ``questions_per_context``) share
    everything up to the question. The prompts form a prefix tree: each shared run of positions
    goes through the decoder once, with gradients, and each example continues on a copy of its KV
    cache, so every example attends to exactly what it would in the padded batch and the gradient
    reaches the shared positions from every example that reads them.

    ``reference``: per example, a text reader's log-probabilities on each target position
    (``target_log_probs``; None: none for that example); its loss then adds ``kl_weight`` times
    KL(reference || this decoder), averaged over the target's positions.
    """
    embedded, target_ids = _embedded_with_targets(decoder, prompts, targets)
    losses, hits, count = [], 0, 0
    for i, logits in _prefix_tree_logits(decoder, embedded, [len(t) for t in target_ids]):
        tgt = target_ids[i]
        loss = nn.functional.cross_entropy(logits, tgt)
        if kl_weight and reference is not None and reference[i] is not None:
            loss = loss + kl_weight * kl_to_reference(logits, reference[i])
        losses.append(loss)
        hits += int((logits.argmax(-1) == tgt).sum())
        count += len(tgt)
    return torch.stack(losses).mean(), hits, count


@torch.no_grad()
def target_log_probs(decoder: LatentDecoder, prompts: Sequence[Sequence[Segment]], targets: Sequence[str]) -> list[torch.Tensor]:
    """Per example, the log-probabilities the decoder puts on each position of its target (and EOS), teacher-forced."""
    embedded, target_ids = _embedded_with_targets(decoder, prompts, targets)
    out: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    for i, logits in _prefix_tree_logits(decoder, embedded, [len(t) for t in target_ids]):
        out[i] = nn.functional.log_softmax(logits, -1)
    return out


def kl_to_reference(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(reference || softmax(logits)); ``reference`` holds log-probabilities."""
    if reference.shape != logits.shape:
        raise ConfigError(f"the text reader's log-probabilities have shape {tuple(reference.shape)}, the answer's logits "
                          f"{tuple(logits.shape)}: reader and model must share a tokenizer")
    return nn.functional.kl_div(nn.functional.log_softmax(logits, -1), reference, log_target=True, reduction="batchmean")


def _embedded_with_targets(decoder: LatentDecoder, prompts: Sequence[Sequence[Segment]], targets: Sequence[str]):
    """Each prompt embedded with its target's tokens after it (the last, EOS, never read), and the target ids."""
    eos = decoder.tokenizer.eos_token_id
    table = decoder.model.get_input_embeddings()
    dev = decoder.device
    embedded, target_ids = [], []
    for segments, target in zip(prompts, targets, strict=True):
        prompt = decoder.embed(segments)
        tgt = torch.tensor(decoder.text_ids(target) + [eos], device=dev)
        embedded.append((torch.cat([prompt, table(tgt[:-1]).to(prompt.dtype)]), len(prompt)))
        target_ids.append(tgt)
    return embedded, target_ids


def _prefix_tree_logits(decoder: LatentDecoder, embedded: list[tuple[torch.Tensor, int]], kept: list[int]):
    """Yield (example index, logits of its last ``kept`` positions), sharing common prompt prefixes."""
    from transformers import DynamicCache

    name = cache_argument(decoder)

    def forward(embeds: torch.Tensor, cache: list | None, keep_cache: bool, **kwargs):
        past = {name: DynamicCache(ddp_cache_data=cache)} if cache is not None else {}
        return decoder.model(inputs_embeds=embeds[None], use_cache=keep_cache or cache is not None, **past, **kwargs)

    def walk(members: list[int], cache: list | None, offset: int):
        if len(members) > 1:
            # each example keeps its last prompt position (it predicts the first target token)
            limit = min(embedded[m][1] for m in members) - 1
            shared = shared_prefix_length([embedded[m][0] for m in members], offset, limit)
            if shared > offset:
                opened = forward(embedded[members[0]][0][offset:shared], cache, True)
                cache = [(layer.keys, layer.values) for layer in getattr(opened, name).layers]
                offset = shared
            groups: list[list[int]] = []
            for m in members:  # split by the next position
                same = next((g for g in groups if torch.equal(embedded[g[0]][0][offset], embedded[m][0][offset])), None)
                if same is None:
                    groups.append([m])
                else:
                    same.append(m)
            if len(groups) == 1:  # nothing more to share before a prompt's last position
                groups = [[m] for m in members]
            for group in groups:
                yield from walk(group, cache, offset)
            return
        (m,) = members
        logits = forward(embedded[m][0][offset:], cache, False, logits_to_keep=kept[m]).logits[0, -kept[m]:].float()
        yield m, logits

    yield from walk(list(range(len(embedded))), None, 0)


def alignment_targets(model: LatentContextModel, token_ids: list[list[int]], ratio: int | None = None) -> list[torch.Tensor]:
    """The decoder's mean input embedding of each latent's group of ``ratio`` tokens (default: the model's).

    Windows hold whole groups (``encoder_window`` is a multiple of the ratio), so the groups are
    consecutive runs of ``ratio`` ids. Needs encoder and decoder to share a tokenizer.
    """
    table = model.decoder.model.get_input_embeddings().weight.detach()
    r = ratio or model.config.ratio
    out = []
    for ids in token_ids:
        emb = table[torch.tensor(ids, device=table.device)]
        out.append(torch.stack([emb[i : i + r].mean(0) for i in range(0, len(ids), r)]))
    return out


def check_shared_tokenizer(model: LatentContextModel) -> None:
    if model.compressor.tokenizer.get_vocab() != model.decoder.tokenizer.get_vocab():
        raise ConfigError("the alignment stage needs the encoder and decoder to share a tokenizer "
                          f"({model.config.encoder} and {model.config.decoder} do not); start at restoration instead")


class TrainingModule(nn.Module):
    """Wraps the model so DDP sees one forward: examples -> (loss, metric name, metric value).

    ``unpadded``: each example teacher-forced in a forward of its own instead of a padded batch.
    ``cache_latents``: while no part of the compressor trains, a passage's latents are the same at
    every step (the encoder is deterministic: no dropout), so each is computed once and kept, up to
    ``cache_size`` passages. Any step that trains the compressor empties the cache.
    """

    def __init__(self, model: LatentContextModel, unpadded: bool = True, cache_latents: bool = True,
                 cache_size: int = 20_000) -> None:
        super().__init__()
        self.model = model
        self.unpadded, self.cache_latents, self.cache_size = unpadded, cache_latents, cache_size
        self._latents: dict[tuple[int, str], torch.Tensor] = {}

    def latents(self, passages: list[str], encoder_trainable: bool) -> list[torch.Tensor]:
        """Each passage's latents: differentiable while the compressor trains, else from the cache."""
        compressor = self.model.compressor
        if encoder_trainable or not self.cache_latents:
            self._latents.clear()
            distinct = list(dict.fromkeys(passages))  # a passage read by several questions is encoded once
            with torch.set_grad_enabled(encoder_trainable and torch.is_grad_enabled()):
                fresh = dict(zip(distinct, compressor.encode_ids(compressor.tokenize(distinct))))
            return [fresh[p] for p in passages]
        ratio = self.model.config.ratio
        missing = list(dict.fromkeys(p for p in passages if (ratio, p) not in self._latents))
        if missing:
            with torch.no_grad():
                fresh = compressor.encode_ids(compressor.tokenize(missing))
            while len(self._latents) + len(missing) > self.cache_size and self._latents:
                self._latents.pop(next(iter(self._latents)))  # the oldest first
            self._latents.update({(ratio, p): z for p, z in zip(missing, fresh)})
        return [self._latents[(ratio, p)] for p in passages]

    def forward(self, examples: list[Example], encoder_trainable: bool, alignment: bool = False,
                reference: Sequence[torch.Tensor | None] | None = None, kl_weight: float = 0.0):
        compressor = self.model.compressor
        passages = [p for ex in examples for p in ex.passages]
        if alignment:
            ids = compressor.tokenize(passages)
            with torch.set_grad_enabled(encoder_trainable and torch.is_grad_enabled()):
                latents = compressor.encode_ids(ids)
            dec = self.model.decoder
            predicted = dec.projector(torch.cat(latents).to(dec.projector.fc1.weight.dtype))
            target = torch.cat(alignment_targets(self.model, ids)).to(predicted.dtype)
            cosine = nn.functional.cosine_similarity(predicted.detach(), target).mean().item()
            return nn.functional.mse_loss(predicted, target), "cosine", cosine
        latents = self.latents(passages, encoder_trainable)
        loss, correct, total = teacher_forced_batch(self.model, examples, latents, unpadded=self.unpadded,
                                                    reference=reference, kl_weight=kl_weight)
        return loss, "token_acc", correct / max(total, 1)
