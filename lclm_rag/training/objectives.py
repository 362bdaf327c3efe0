"""What a training step minimises: teacher-forced loss on targets after latent prompts, or, in the
alignment stage, the projector's distance to the decoder's own embeddings of each latent's tokens."""

from __future__ import annotations

import torch
from torch import nn

from lclm_rag.errors import ConfigError
from lclm_rag.model import LatentContextModel
from lclm_rag.training.examples import Example


def teacher_forced_batch(model: LatentContextModel, examples: list[Example], latents: list[torch.Tensor],
                         per_token: bool = False, unpadded: bool = False):
    """Loss (mean over examples of the per-token loss on the target), correct and total target tokens.

    ``latents`` holds the examples' passages in order, ``len(ex.passages)`` per example.
    ``unpadded``: each example in a forward of its own, so no position is padding (the same loss and
    gradient: padding never enters the loss). A batch that mixes a 60-position restoration example
    with 350-position QA prompts is ~40% padding; on a CPU, rows of their own cost less than the
    padded batch (docs/training.md).
    """
    slots, cursor = [], 0
    for ex in examples:
        slots.append(latents[cursor : cursor + len(ex.passages)])
        cursor += len(ex.passages)
    targets = [ex.target for ex in examples]
    messages = [ex.user_message for ex in examples]
    if not unpadded or per_token:
        return model.teacher_forced(messages, slots, targets, per_token)
    losses, correct, total = [], 0, 0
    for message, slot, target in zip(messages, slots, targets):
        loss, hits, count = model.teacher_forced([message], [slot], [target])
        losses.append(loss)
        correct, total = correct + hits, total + count
    return torch.stack(losses).mean(), correct, total


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
            with torch.set_grad_enabled(encoder_trainable and torch.is_grad_enabled()):
                return compressor.encode_ids(compressor.tokenize(passages))
        ratio = self.model.config.ratio
        missing = list(dict.fromkeys(p for p in passages if (ratio, p) not in self._latents))
        if missing:
            with torch.no_grad():
                fresh = compressor.encode_ids(compressor.tokenize(missing))
            while len(self._latents) + len(missing) > self.cache_size and self._latents:
                self._latents.pop(next(iter(self._latents)))  # the oldest first
            self._latents.update({(ratio, p): z for p, z in zip(missing, fresh)})
        return [self._latents[(ratio, p)] for p in passages]

    def forward(self, examples: list[Example], encoder_trainable: bool, alignment: bool = False):
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
        loss, correct, total = teacher_forced_batch(self.model, examples, latents, unpadded=self.unpadded)
        return loss, "token_acc", correct / max(total, 1)
