"""LatentContextModel: compressor (encoder side) + projector and decoder (decoder side)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lclm_rag.checkpoint import DEFAULT_CHECKPOINT, LCLM_ADAPTER, is_lclm_layout, load_config, packaged_checkpoints, resolve_checkpoint
from lclm_rag.compressor import LatentCompressor
from lclm_rag.config import LatentConfig
from lclm_rag.decoder import LatentDecoder
from lclm_rag.errors import ConfigError, InputError
from lclm_rag.prompt import Segment, Slot
from lclm_rag.skim import SKIM_PROBE_FILE, SkimProbe

logger = logging.getLogger(__name__)


class LatentContextModel(nn.Module):
    """Compress passages, then answer questions from their latents (and optional raw text)."""

    def __init__(self, config: LatentConfig, compressor: LatentCompressor | None = None, decoder: LatentDecoder | None = None):
        super().__init__()
        self.compressor = compressor if compressor is not None else LatentCompressor(config)
        self.decoder = decoder if decoder is not None else LatentDecoder(self.compressor.config)
        self.config = self.decoder.config  # both widths filled in; the caller's config is left as given
        if self.compressor.config.encoder_hidden_size != self.config.encoder_hidden_size:
            raise ConfigError(f"the compressor's latents are {self.compressor.config.encoder_hidden_size}-d but the "
                              f"decoder's projector reads {self.config.encoder_hidden_size}-d")
        self.compressor.config = self.config
        self.directory: Path | None = None  # the checkpoint directory it was loaded from (files saved beside it)
        self.skim_probe: SkimProbe | None = None  # the ``skim`` policy's probe for this reader (`use_skim_probe`)
        self._probe_checked = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: LatentConfig) -> "LatentContextModel":
        """Fresh trainable parts (random projector) on top of the referenced base models."""
        return cls(config)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = DEFAULT_CHECKPOINT, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, engine: str = "hf", **overrides: Any) -> "LatentContextModel":
        """Load a checkpoint: a packaged name, a local directory (ours, LCLM's, Squid's or ARC-Encoder's
        layout) or a hub id.

        ``device`` (default CPU) and ``dtype`` (default bfloat16 on CUDA, float32 otherwise) place
        the whole model. The fingerprint is taken from the weights as stored, before any cast, so
        a collection ingested in float32 is read by the same checkpoint in bfloat16 (the query path
        never re-encodes). ``engine`` picks the decode engine (``hf`` | ``vllm``; `use_engine` for
        a server or engine settings). ``overrides`` replace config fields before the weights load, e.g.
        ``ratio=8`` to start a 1:8 model from a 1:4 one (mean pooling has no ratio-shaped weights).
        """
        directory = resolve_checkpoint(name_or_path, decoder=overrides.get("decoder"))
        config = load_config(directory)
        if overrides:
            config = LatentConfig.from_dict({**config.to_dict(), **overrides})
        model = cls(config)
        model.directory = directory
        if is_lclm_layout(directory):
            model.decoder.load_trained(directory, projector_file=LCLM_ADAPTER)
        else:
            model.compressor.load_trained(directory)
            model.decoder.load_trained(directory)
        if (directory / SKIM_PROBE_FILE).is_file():
            model.skim_probe = SkimProbe.from_pretrained(directory)  # checked against the reader at first use
        model.eval()
        device = torch.device(device) if device is not None else None
        dtype = resolve_dtype(dtype, device)
        if dtype != torch.float32 or device is not None:
            model.fingerprint()  # cached from the stored weights
            model.to(device=device, dtype=dtype)
        if engine != "hf":
            model.use_engine(engine)
        return model

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.model.get_input_embeddings().weight.dtype

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json and the trained parts only; base weights stay referenced."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory)
        self.compressor.save_trained(directory)
        self.decoder.save_trained(directory)
        if self.skim_probe is not None:
            self.skim_probe.save_pretrained(directory)
        return directory

    def use_skim_probe(self, probe: SkimProbe | None) -> "LatentContextModel":
        """Make ``probe`` the one the ``skim`` policy applies (checked against this reader now)."""
        if probe is not None:
            probe.check_reader(self.decoder.fingerprint())
        self.skim_probe, self._probe_checked = probe, probe is not None
        return self

    def require_skim_probe(self) -> SkimProbe:
        """The fitted probe the ``skim`` policy needs, checked against this reader, or a clear error."""
        if self.skim_probe is None:
            raise ConfigError("the skim policy needs a fitted probe: this model has none (fit one with lclm-rag "
                              "fit-skim-probe, or give one to model.use_skim_probe)")
        if not self._probe_checked:  # a checkpoint's own probe: its reader's fingerprint is taken once, here
            self.skim_probe.check_reader(self.decoder.fingerprint())
            self._probe_checked = True
        return self.skim_probe

    def fingerprint(self) -> str:
        return self.compressor.fingerprint()

    # ------------------------------------------------------------------ use
    def use_engine(self, engine: str = "hf", **engine_kwargs: Any) -> "LatentContextModel":
        """Decode on ``hf`` (default), ``vllm`` in process, or a vLLM server (``url=...``); see `lclm_rag.engine`."""
        self.decoder.use_engine(engine, **engine_kwargs)
        return self

    def compress(self, texts: Sequence[str], batch_size: int = 16) -> list[torch.Tensor]:
        return self.compressor.compress(texts, batch_size=batch_size)

    def answer(self, questions: str | Sequence[str], contexts: Sequence[Slot] | Sequence[Sequence[Slot]] = (), **gen) -> str | list[str]:
        """Answer one question (``contexts`` = its slots) or a batch (``contexts`` = slots per question).

        A slot is a latent tensor from ``compress`` or a passage's raw text (expanded); for one
        question a bare string or tensor is one passage (a string is never read letter by letter).
        """
        single = isinstance(questions, str)
        if single and isinstance(contexts, (str, torch.Tensor)):
            contexts = [contexts]
        elif not single and isinstance(contexts, (str, torch.Tensor)):
            raise InputError("a batch of questions needs a list of passages per question, not one passage")
        qs = [questions] if single else list(questions)
        ctxs = [list(contexts)] if single else [list(c) for c in contexts] if contexts else [[] for _ in qs]
        prompts = [self.decoder.qa_segments(q, c) for q, c in zip(qs, ctxs, strict=True)]
        answers = self.decoder.generate_from_segments(prompts, **gen)
        return answers[0] if single else answers

    def stream(self, question: str, slots: Sequence[Slot] = (), **gen) -> Iterator[str]:
        return self.decoder.stream_from_segments(self.decoder.qa_segments(question, slots), **gen)

    def teacher_forced(self, messages: Sequence[str], slots: Sequence[Sequence[Slot]], targets: Sequence[str], per_token: bool = False):
        """Teacher forcing of ``targets`` after each user message with its slots (see ``LatentDecoder.teacher_forced``)."""
        prompts = [self.decoder.embed(self.decoder.segments(m, s)) for m, s in zip(messages, slots, strict=True)]
        return self.decoder.teacher_forced(prompts, targets, per_token=per_token)

    def prompt_positions(self, segments: Sequence[Segment]) -> int:
        return sum(s.positions for s in segments)


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | None) -> torch.dtype:
    """A torch dtype from a dtype, its name ("bfloat16", "bf16", "float32", ...) or None (bf16 on CUDA, else fp32)."""
    if dtype is None:
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    resolved = getattr(torch, names.get(str(dtype).lower(), str(dtype).lower()), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ConfigError(f"dtype must be a floating-point torch dtype or its name (bfloat16, float16, float32), got {dtype!r}")
    return resolved


def load_model(checkpoint: str | Path | None = None) -> LatentContextModel:
    """The given checkpoint; else the packaged default; else an untrained default (with a warning)."""
    if checkpoint:
        return LatentContextModel.from_pretrained(checkpoint)
    if DEFAULT_CHECKPOINT in packaged_checkpoints():
        return LatentContextModel.from_pretrained(DEFAULT_CHECKPOINT)
    logger.warning("no trained checkpoint is packaged: using an untrained projector (answers from latents are noise)")
    return LatentContextModel.from_config(LatentConfig()).eval()


def load_compressor(checkpoint: str | Path | None = None) -> LatentCompressor:
    """Only the encoder side (what ingestion needs), resolved like ``load_model``."""
    if checkpoint or DEFAULT_CHECKPOINT in packaged_checkpoints():
        return LatentCompressor.from_pretrained(checkpoint or DEFAULT_CHECKPOINT).eval()
    return LatentCompressor(LatentConfig()).eval()
