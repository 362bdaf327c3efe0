"""The decoder side: a causal LM that reads passages given as latents (or raw text) in its prompt.

A prompt is the decoder's own chat template with one slot per passage. A slot holds either the
passage's encoder-side latents, projected here into the decoder's input-embedding space and put
between two boundary embeddings, or the passage's raw text (an *expanded* passage). The whole
prompt goes to ``generate(inputs_embeds=...)``, which uses the KV cache as usual.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from lclm_rag.compressor import tensor_digest
from lclm_rag.config import LatentConfig
from lclm_rag.engine import DecodeEngine, GenerationSettings, HFEngine, make_engine
from lclm_rag.errors import ConfigError, InputError
from lclm_rag.hub import keep_reference, resolve_model
from lclm_rag.projector import Projector
from lclm_rag.prompt import SENTINEL_RE, Segment, Slot, qa_message, render_prompt

PROJECTOR_WEIGHTS = "projector.safetensors"
DECODER_WEIGHTS = "decoder.safetensors"
DECODER_LORA_DIR = "decoder_lora"


@functools.cache
def _cache_argument(model_class: type) -> str:
    """The KV cache's name in a model's forward and outputs: ``cache`` in transformers 5.2x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_argument(decoder: "LatentDecoder") -> str:
    """The KV cache's argument name for this decoder's LM (adapters unwrapped)."""
    base = decoder.model.get_base_model() if hasattr(decoder.model, "get_base_model") else decoder.model
    return _cache_argument(type(base))


def _same_prefix(a: Sequence[Segment], b: Sequence[Segment], last: int) -> bool:
    """Do two prompts agree on their first ``last + 1`` segments (the same tokens, the same latents)?"""
    if len(a) <= last or len(b) <= last:
        return False
    return all(x.token_ids == y.token_ids and (x.latents is y.latents or (x.latents is not None and y.latents is not None
               and torch.equal(x.latents, y.latents))) for x, y in zip(a[: last + 1], b[: last + 1]))


def _hidden_size(name_or_path: str) -> int:
    """Width of a model's hidden states, from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(name_or_path))
    return getattr(config, "hidden_size", None) or config.get_text_config().hidden_size


def load_decoder_lm(path: str) -> nn.Module:
    """The decoder's causal LM. Weights it does not use are skipped without a report (a Squid checkpoint's
    shards also hold its encoder and projector, read in place); a weight it lacks is an error."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    lacking = sorted(info.get("missing_keys", ())) + sorted(info.get("mismatched_keys", ()))
    if lacking:
        raise ConfigError(f"the decoder at {path!r} lacks or mis-sizes the weights {lacking[:4]}"
                          f"{' ...' if len(lacking) > 4 else ''}")
    return model


class LatentDecoder(nn.Module):
    def __init__(self, config: LatentConfig, model: nn.Module | None = None, tokenizer=None) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.config = config
        path = None if model is not None and tokenizer is not None else resolve_model(config.decoder)
        if model is None:
            model = load_decoder_lm(path)
            keep_reference(model, config.decoder)
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        hidden = self.model.get_input_embeddings().weight.shape[1]
        if config.decoder_hidden_size and config.decoder_hidden_size != hidden:
            raise ConfigError(
                f"config says decoder_hidden_size={config.decoder_hidden_size} but {config.decoder!r} has {hidden}"
            )
        encoder_hidden = config.encoder_hidden_size or _hidden_size(config.encoder)
        self.config = config = dataclasses.replace(config, decoder_hidden_size=hidden, encoder_hidden_size=encoder_hidden)
        self.projector = Projector(config.encoder_hidden_size, hidden, config.projector_hidden_size, config.projector_eps,
                                   config.projector_kind)
        self._scale_projector_output()
        embed = self.model.get_input_embeddings().weight.detach()
        sides = config.boundary_positions  # both sides, or only after the latents (the end token's row)
        if config.boundary == "learned":
            init = embed.mean(0, keepdim=True).repeat(sides, 1) + 0.02 * embed.std() * torch.randn(sides, hidden)
            self.boundary = nn.Parameter(init)
            self.boundary_ids = None
        else:
            self.boundary = None
            tokens = config.boundary_tokens[-sides:]
            ids = [self.tokenizer.convert_tokens_to_ids(t) for t in tokens]
            unk = self.tokenizer.unk_token_id
            missing = [t for t, i in zip(tokens, ids) if i is None or (i == unk and t != self.tokenizer.unk_token)]
            if missing:
                raise ConfigError(f"boundary tokens {missing} are not in the decoder tokenizer of {config.decoder!r}")
            self.boundary_ids = ids
        if config.decoder_lora:
            from lclm_rag.checkpoint import add_lora

            self.model = add_lora(self.model, config.decoder_lora)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.engine: DecodeEngine = HFEngine(self)
        self.base_active = False  # set inside ``base()``

    @torch.no_grad()
    def reset_projector(self) -> None:
        """A fresh, uncalibrated projector whose output starts at the scale of real token embeddings."""
        self.projector.reset_parameters()
        self._scale_projector_output()

    @torch.no_grad()
    def _scale_projector_output(self) -> None:
        """Start the projector's output at the scale of real token embeddings."""
        embed = self.model.get_input_embeddings().weight.detach()
        last = self.projector.layers[-1].weight
        last.mul_(embed.std() / (last.std() * (self.projector.out_features**0.5) + 1e-12))

    # ------------------------------------------------------------------ prompt building
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int | None:
        """How many prompt + answer positions the decoder LM reads (its context), if it says."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @contextlib.contextmanager
    def base(self) -> Iterator[None]:
        """Within this context the decoder runs without its LoRA adapters: the base LM users start from.

        Engines that serve a merged copy read ``base_active`` and decode on the base model instead.
        """
        adapters = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
        with adapters:
            self.base_active = True
            try:
                yield
            finally:
                self.base_active = False

    def text_ids(self, text: str) -> list[int]:
        """Decoder token ids of ``text`` (no special tokens added)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def qa_user_message(self, question: str, num_slots: int, notes: Sequence[str] | None = None) -> str:
        """The user turn for a question over ``num_slots`` passages, with this model's instruction
        (``notes``: text after each passage, e.g. its sidecar of exact strings)."""
        return qa_message(self.config.qa_instruction, question, num_slots, self.config.prompt_template, notes)

    def segments(self, user_message: str, slots: Sequence[Slot]) -> list[Segment]:
        """Render the chat template (with the generation prompt) and cut it at the latent slots.

        Expanded passages (text slots) are put into the text first and tokenized with what
        surrounds them, as the decoder would tokenize the whole prompt written out.
        """
        text = self.render(user_message)
        out: list[Segment] = []
        pending, pos = [], 0
        for match in SENTINEL_RE.finditer(text):
            pending.append(text[pos : match.start()])
            pos = match.end()
            index = int(match.group(1))
            slot = slots[index]
            if isinstance(slot, str):
                if not slot.strip():
                    raise InputError(f"passage {index} is empty")
                pending.append(self.as_document_text(slot))
            elif isinstance(slot, torch.Tensor):
                if slot.ndim != 2 or slot.shape[0] == 0:
                    raise InputError(f"passage {index} latents must be (n>0, width), got {tuple(slot.shape)}")
                if not torch.isfinite(slot).all():
                    raise InputError(f"passage {index} latents are not finite (NaN or inf): re-ingest the passage")
                out.append(Segment(token_ids=self.text_ids("".join(pending))))
                out.append(Segment(latents=slot, boundaries=self.config.boundary_positions))
                pending = []
            else:
                raise InputError(f"passage {index} is {type(slot).__name__}: give latents (a tensor) or text")
        pending.append(text[pos:])
        out.append(Segment(token_ids=self.text_ids("".join(pending))))
        return [s for s in out if s.token_ids is None or s.token_ids]

    def render(self, user_message: str) -> str:
        """The prompt's text around the user turn, in this model's ``decoder_prompt`` form."""
        return render_prompt(self.tokenizer, user_message, self.config.decoder_prompt, self.config.system_message)

    def as_document_text(self, text: str) -> str:
        """A passage's text with the tokenizer's special tokens (``<|im_start|>``, ``<|endoftext|>``, ...)
        broken by a zero-width space, so they tokenize as plain text: a document read as text can
        neither open a turn nor end one. Text without them is left exactly as it is."""
        specials = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special and t.content}
        for token in sorted(specials, key=len, reverse=True):
            if token in text:
                text = text.replace(token, token[0] + "\u200b" + token[1:])
        return text

    def qa_segments(self, question: str, slots: Sequence[Slot], notes: Sequence[str] | None = None) -> list[Segment]:
        return self.segments(self.qa_user_message(question, len(slots), notes), slots)

    def embed(self, segments: Sequence[Segment]) -> torch.Tensor:
        """(positions, hidden) input embeddings of one prompt."""
        table = self.model.get_input_embeddings()
        dev = self.device
        parts = []
        for seg in segments:
            if seg.token_ids is not None:
                parts.append(table(torch.tensor(seg.token_ids, device=dev)))
                continue
            projected = self.projector(seg.latents.to(dev, self.projector.fc1.weight.dtype)).to(table.weight.dtype)
            sides = self.boundary if self.boundary is not None else table(torch.tensor(self.boundary_ids, device=dev))
            sides = sides.to(projected.dtype)
            parts.extend([sides[:-1], projected, sides[-1:]])  # (start,) latents, end
        return torch.cat(parts)

    def pad_batch(self, prompts: Sequence[torch.Tensor], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """Stack (L_i, H) prompts into (B, L, H) with an attention mask; left padding for generation."""
        width = max(p.shape[0] for p in prompts)
        hidden = prompts[0].shape[1]
        embeds = prompts[0].new_zeros(len(prompts), width, hidden)
        mask = torch.zeros(len(prompts), width, dtype=torch.long, device=prompts[0].device)
        for i, p in enumerate(prompts):
            if side == "left":
                embeds[i, width - p.shape[0] :], mask[i, width - p.shape[0] :] = p, 1
            else:
                embeds[i, : p.shape[0]], mask[i, : p.shape[0]] = p, 1
        return embeds, mask

    # ------------------------------------------------------------------ generation
    def use_engine(self, engine: "str | DecodeEngine" = "hf", **engine_kwargs) -> "DecodeEngine":
        """Decode with ``hf`` (transformers, this process), ``vllm`` (in process) or, given
        ``url=``, a vLLM server; see `lclm_rag.engine`. Prompt building is the same for all."""
        self.engine = make_engine(self, engine, **engine_kwargs)
        return self.engine

    @torch.no_grad()
    def generate_from_segments(self, prompts: Sequence[Sequence[Segment]], **settings) -> list[str]:
        """Decode a batch of prompts on this decoder's engine; returns only the new text of each.

        ``settings`` are `GenerationSettings` fields: sampling ones apply with ``do_sample``;
        ``repetition_penalty`` applies to greedy decoding too.
        """
        return self.engine.generate([self.embed(p) for p in prompts], GenerationSettings(**settings))

    def stream_from_segments(self, segments: Sequence[Segment], **settings) -> Iterator[str]:
        """Yield text pieces as they are decoded."""
        with torch.no_grad():
            prompt = self.embed(segments)
        return self.engine.stream(prompt, GenerationSettings(**settings))

    @torch.no_grad()
    def latent_attention(self, segments: Sequence[Segment], calibration: Sequence[Segment] | None = None,
                         per_head: bool = False) -> list[float] | torch.Tensor:
        """The question's attention: the mass the question's positions put on each latent passage's span,
        averaged over those positions, layers and heads (in-context re-ranking, arXiv 2410.02642).

        ``calibration``: the same prompt with a content-free question (`CONTENT_FREE_QUESTION`); its
        masses are subtracted, which removes the decoder's preference for some spans (the nearest, the
        longest) whatever is asked. Everything up to the end of the last passage is prefilled once
        and its KV cache reused for both questions. The question's positions are those after the last
        passage (question and chat template); they run with eager attention (fused kernels return no weights).
        ``per_head``: a (layers, heads, passages) tensor instead of the average (features for a probe).
        """
        spans, pos, last = [], 0, -1
        for i, seg in enumerate(segments):
            if seg.latents is not None:
                spans.append((pos, pos + seg.positions))
                last = i
            pos += seg.positions
        if last < 0:
            return torch.zeros(0) if per_head else []
        if last == len(segments) - 1:
            raise InputError("nothing follows the last passage: the attention read is that of the positions after it")
        if calibration is not None and not _same_prefix(segments, calibration, last):
            raise InputError("the calibration prompt must share everything up to the last passage with the question's")
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        name = _cache_argument(type(base))
        # the passages' prefill, the bulk of the work, runs on the fused kernels: only the question
        # passes need their attention weights
        prefix = self.model(inputs_embeds=self.embed(segments[: last + 1])[None], use_cache=True)
        cache, prefix_len = getattr(prefix, name), spans[-1][1]

        def masses(suffix: Sequence[Segment]) -> torch.Tensor:
            out = self.model(inputs_embeds=self.embed(suffix)[None], **{name: cache}, output_attentions=True, use_cache=True)
            cache.crop(prefix_len - cache.get_seq_length())  # back to the shared prefix (a negative crop removes that many)
            rows = torch.stack([a[0] for a in out.attentions])  # layers, heads, question positions, keys
            mean = rows.float().mean(2)
            return torch.stack([mean[..., a:b].sum(-1) for a, b in spans], -1)

        previous = base.config._attn_implementation
        base.set_attn_implementation("eager")
        try:
            mass = masses(segments[last + 1 :])
            if calibration is not None:
                mass = mass - masses(calibration[last + 1 :])
        finally:
            base.set_attn_implementation(previous)
        return mass if per_head else [float(m) for m in mass.mean((0, 1))]

    @torch.no_grad()
    def answer_confidence(self, segments: Sequence[Segment], answer: str) -> float:
        """exp(mean log-probability) of ``answer`` (+ EOS) after the prompt: 1.0 for a certain answer.

        Teacher-forced in one forward, so it scores an answer from any engine the same way.
        """
        target = self.text_ids(answer) + [self.tokenizer.eos_token_id]
        prompt = self.embed(segments)
        table = self.model.get_input_embeddings()
        embeds = torch.cat([prompt, table(torch.tensor(target[:-1], device=prompt.device, dtype=torch.long)).to(prompt.dtype)])
        logits = self.model(inputs_embeds=embeds[None], use_cache=False).logits[0, prompt.shape[0] - 1 :].float()
        logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(target, device=logits.device)[:, None])
        return float(logprobs.mean().exp())

    def teacher_forced(self, prompts: Sequence[torch.Tensor], targets: Sequence[str], per_token: bool = False):
        """Teacher forcing of each target text (+ EOS) after its prompt embeddings; loss on the target only.

        Returns the mean over examples of the per-token loss, and correct and total target tokens;
        with ``per_token``, one bool tensor per example instead (is each target token, EOS last,
        the argmax). Training minimises this loss; restoration accuracy reads the tokens.
        """
        eos = self.tokenizer.eos_token_id
        table = self.model.get_input_embeddings()
        inputs, labels = [], []
        for prompt, target in zip(prompts, targets, strict=True):
            tgt = torch.tensor(self.text_ids(target) + [eos], device=prompt.device)
            inputs.append(torch.cat([prompt, table(tgt).to(prompt.dtype)]))
            labels.append(torch.cat([torch.full((prompt.shape[0],), -100, device=prompt.device), tgt]))
        embeds, mask = self.pad_batch(inputs, side="right")
        label_batch = torch.full(mask.shape, -100, dtype=torch.long, device=mask.device)
        for i, lab in enumerate(labels):
            label_batch[i, : lab.shape[0]] = lab
        # logits only where the next token is a target: the vocabulary projection and its softmax are
        # most of a step's cost on the prompt positions, whose logits no loss reads
        keep = torch.zeros_like(mask, dtype=torch.bool)
        keep[:, :-1] = label_batch[:, 1:] != -100
        logits = self.model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=keep).logits
        if logits.dim() == 3:  # a model without logits_to_keep returns every position
            logits = logits[keep]
        logits = logits.float()
        gold = label_batch[:, 1:][keep[:, :-1]]
        row = keep.nonzero()[:, 0]
        token_loss = nn.functional.cross_entropy(logits, gold, reduction="none")
        counts = keep.sum(1)
        per_example = torch.zeros(len(inputs), dtype=token_loss.dtype, device=token_loss.device).index_add(0, row, token_loss)
        per_example = per_example / counts.clamp(min=1)
        hits = logits.argmax(-1) == gold
        if per_token:
            return per_example.mean(), list(torch.split(hits, counts.tolist()))
        return per_example.mean(), hits.sum().item(), int(counts.sum())

    def forward_logits(self, segments: Sequence[Segment]) -> torch.Tensor:
        """Logits of one prompt (teacher forcing, tests and evaluation)."""
        embeds = self.embed(segments).unsqueeze(0)
        return self.model(inputs_embeds=embeds).logits[0]

    # ------------------------------------------------------------------ persistence
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"projector.{k}": v.detach() for k, v in self.projector.state_dict().items()}
        if self.boundary is not None:
            state["boundary"] = self.boundary.detach()
        return state

    def fingerprint(self) -> str:
        """Hash of the trained reading side (projector, boundary, LoRA): which model reads the latents.

        The compressor's fingerprint says which latents are stored; two checkpoints can share it
        (a frozen encoder) and still answer differently.
        """
        state = dict(self.trainable_state_dict())
        if self.config.decoder_lora:
            from peft import get_peft_model_state_dict

            from lclm_rag.checkpoint import targets_embeddings

            # decided as saving does: peft's "auto" would ask the hub (and warn offline) on every call
            lora = get_peft_model_state_dict(self.model, save_embedding_layers=targets_embeddings(self.model))
            state.update({f"lora.{k}": v for k, v in lora.items()})
        return tensor_digest(state)[:32]

    def save_trained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        from lclm_rag.checkpoint import save_adapter

        directory = Path(directory)
        save_file({k: v.contiguous() for k, v in self.projector.state_dict().items()}, str(directory / PROJECTOR_WEIGHTS))
        if self.boundary is not None:
            save_file({"boundary": self.boundary.detach().contiguous()}, str(directory / DECODER_WEIGHTS))
        if self.config.decoder_lora:
            save_adapter(self.model, directory / DECODER_LORA_DIR)

    def load_trained(self, directory: str | Path, projector_file: str = PROJECTOR_WEIGHTS) -> None:
        """Load the decoder-side parts the checkpoint trained; a decoder LoRA or learned boundary
        this config adds to the checkpoint's own keeps its fresh initialisation."""
        from lclm_rag.checkpoint import load_adapter, load_config, load_safetensors, require_file, resolve_checkpoint

        directory = resolve_checkpoint(directory)  # a packaged checkpoint's name, or a path
        saved = load_config(directory)
        state = load_safetensors(require_file(directory, projector_file))
        expected = self.projector.state_dict()
        for key, value in state.items():
            if key in expected and expected[key].shape != value.shape:
                raise ConfigError(
                    f"{projector_file}: {key} has shape {tuple(value.shape)} but this encoder/decoder pair needs "
                    f"{tuple(expected[key].shape)} (projector {self.projector.in_features} -> {self.projector.out_features})"
                )
        for key in ("latent_shift", "latent_scale"):  # absent from LCLM adapters and uncalibrated projectors
            state.setdefault(key, expected[key])
        self.projector.load_state_dict(state, strict=True)
        if self.boundary is not None and saved.boundary == "learned":
            boundary = load_safetensors(require_file(directory, DECODER_WEIGHTS))["boundary"]
            if boundary.shape != self.boundary.shape:
                raise ConfigError(f"{DECODER_WEIGHTS}: boundary has shape {tuple(boundary.shape)} but this decoder needs "
                                  f"{tuple(self.boundary.shape)} (boundary_sides={self.config.boundary_sides!r})")
            with torch.no_grad():
                self.boundary.copy_(boundary)
        if self.config.decoder_lora and saved.decoder_lora:
            load_adapter(self.model, directory, DECODER_LORA_DIR)
