"""The one configuration object of a latent-context model, saved as ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lclm_rag.errors import CheckpointError, ConfigError
from lclm_rag.hub import DEFAULT_LM

CONFIG_NAME = "config.json"
FORMAT_NAME = "lclm-rag"
FORMAT_VERSION = 1
POOLING_MODES = ("mean", "memory", "concat", "pooled_queries")
ATTENTION_MODES = ("causal", "bidirectional")
BOUNDARY_MODES = ("learned", "tokens")
BOUNDARY_SIDES = ("both", "end")
PROJECTOR_KINDS = ("mlp", "linear", "factored")  # lclm_rag.projector.Projector
DECODER_PROMPTS = ("chat", "text", "bos-text")
PROMPT_TEMPLATES = ("lclm-rag", "lclm", "squid", "arc")  # named QA prompt forms (lclm_rag.prompt.qa_message)


@dataclass
class LatentConfig:
    """Every setting that shapes the encoder, projector and decoder.

    Base models are referenced by id or path, never copied into a checkpoint.
    """

    # --- encoder side: everything here determines the stored latents (see fingerprint) ---
    encoder: str = DEFAULT_LM  # HF id or local path of the encoder causal LM
    encoder_layers: int | None = 2  # keep only the first k transformer layers (None: all)
    encoder_attention: str = "causal"  # inside a window: "causal" (the LM as pretrained) or
    #                                    "bidirectional" (every token sees the whole window)
    pooling: str = "mean"  # "mean": average hidden states per group of `ratio` tokens (LCLM);
    #                        "memory": append learned memory tokens, take their states (Squid);
    #                        "concat": join a group's `ratio` states, map back to the latent width
    #                        with a trained linear layer (order-aware; starts equal to "mean");
    #                        "pooled_queries": the last encoder layer reads one query per group
    #                        (the mean of its states) against every state of the window (ARC-Encoder)
    ratio: int = 4  # tokens per latent vector: n = ceil(T / ratio)
    encoder_window: int = 512  # tokens per encoder forward (rounded down to a multiple of ratio);
    #                            longer passages are compressed window by window
    encoder_hidden_size: int = 0  # width of a latent vector (filled from the encoder config)
    encoder_lora: dict[str, Any] | None = None  # peft LoraConfig kwargs if the encoder is adapted
    memory_slots: int | None = None  # memory pooling: this many slots per window whatever its length
    #                                  (Squid: 32) instead of ceil(T / ratio)

    # --- projector: encoder width -> decoder input-embedding width ---
    projector_hidden_size: int | None = None  # intermediate width (None: the decoder width)
    projector_eps: float = 1e-6  # RMSNorm epsilon
    projector_kind: str = "mlp"  # "mlp" (RMSNorm, Linear, GELU, Linear: ours and LCLM's), "linear" (one
    #                              Linear with bias: Squid's), "factored" (two bias-free Linears: ARC's)

    # --- decoder side: can be retrained without re-ingesting anything ---
    decoder: str = DEFAULT_LM  # HF id or local path of the decoder causal LM
    decoder_hidden_size: int = 0  # filled from the decoder config
    boundary: str = "learned"  # "learned": two trained vectors around each passage's latents;
    #                            "tokens": embeddings of the special tokens below (LCLM)
    boundary_tokens: tuple[str, str] = ("<|memory_start|>", "<|memory_end|>")
    boundary_sides: str = "both"  # "both": a boundary before and after each passage's latents; "end":
    #                               after them only (Squid, ARC-Encoder)
    decoder_lora: dict[str, Any] | None = None  # peft LoraConfig kwargs if the decoder is adapted
    qa_instruction: str = "Answer the question using the context. Reply with a short answer only."
    prompt_template: str = "lclm-rag"  # the QA user turn: "lclm-rag" (instruction, "Context:" with [i] per
    #   passage, "Question:"), "lclm" (LCLM's documented form: the passages between their memory
    #   boundaries, then the question), or your own text with {context} and {question} fields
    system_message: str | None = None  # a system turn before the user turn (None: the chat template's default)
    decoder_prompt: str = "chat"  # "chat": the user turn inside the decoder's chat template; "text": the
    #                               user turn as plain text (Squid); "bos-text": BOS, then the text (ARC)
    sidecar_terms: int = 0  # the passage's first n key terms (names, dates, numbers: lclm_rag.sidecar) as text
    #                         after each passage read as latents, as the decoder was trained to read them
    #                         (a stage's key_terms); stored at ingestion, counted in the plan; 0: none

    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (training run, ...)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int) or self.ratio <= 0:
            raise ConfigError(f"ratio must be a positive integer (tokens per latent), got {self.ratio!r}")
        if self.pooling not in POOLING_MODES:
            raise ConfigError(f"pooling must be one of {POOLING_MODES}, got {self.pooling!r}")
        if self.encoder_attention not in ATTENTION_MODES:
            raise ConfigError(f"encoder_attention must be one of {ATTENTION_MODES}, got {self.encoder_attention!r}")
        for name, value, allowed in (("boundary", self.boundary, BOUNDARY_MODES), ("boundary_sides", self.boundary_sides, BOUNDARY_SIDES),
                                     ("projector_kind", self.projector_kind, PROJECTOR_KINDS),
                                     ("decoder_prompt", self.decoder_prompt, DECODER_PROMPTS)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        if self.memory_slots is not None and (self.pooling != "memory" or isinstance(self.memory_slots, bool)
                                              or not isinstance(self.memory_slots, int) or self.memory_slots <= 0):
            raise ConfigError(f"memory_slots must be a positive integer with memory pooling, got {self.memory_slots!r} "
                              f"with pooling={self.pooling!r}")
        if self.pooling == "pooled_queries" and self.encoder_layers is not None and self.encoder_layers < 2:
            raise ConfigError("pooled_queries pooling needs encoder_layers >= 2: the last layer reads the pooled queries")
        if isinstance(self.sidecar_terms, bool) or not isinstance(self.sidecar_terms, int) or self.sidecar_terms < 0:
            raise ConfigError(f"sidecar_terms must be a count >= 0, got {self.sidecar_terms!r}")
        if self.encoder_layers is not None and (not isinstance(self.encoder_layers, int) or self.encoder_layers <= 0):
            raise ConfigError(f"encoder_layers must be a positive integer or None, got {self.encoder_layers!r}")
        if not isinstance(self.encoder_window, int) or self.encoder_window < self.ratio:
            raise ConfigError(f"encoder_window ({self.encoder_window!r}) must be an integer >= ratio ({self.ratio})")
        # windows hold whole groups of `ratio` tokens: round down (512 -> 510 for ratio 3)
        self.encoder_window -= self.encoder_window % self.ratio
        self.boundary_tokens = tuple(self.boundary_tokens)
        if self.prompt_template not in PROMPT_TEMPLATES and not (
            "{context}" in self.prompt_template and "{question}" in self.prompt_template
        ):
            raise ConfigError(f"prompt_template must be one of {PROMPT_TEMPLATES} or a text with {{context}} and {{question}} "
                              f"fields, got {self.prompt_template!r}")

    @property
    def max_memory_tokens(self) -> int:
        """Latents per encoder window (memory pooling learns one embedding per slot)."""
        return self.memory_slots or math.ceil(self.encoder_window / self.ratio)

    @property
    def boundary_positions(self) -> int:
        """Boundary embeddings around each passage's latents (two, or one after them)."""
        return 2 if self.boundary_sides == "both" else 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["boundary_tokens"] = list(self.boundary_tokens)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatentConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}; this lclm-rag knows {sorted(known)}")
        if d.get("format", FORMAT_NAME) != FORMAT_NAME:
            raise ConfigError(f"config format {d.get('format')!r} is not {FORMAT_NAME!r}")
        version = d.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ConfigError(f"config format_version {version!r} is newer than this lclm-rag reads ({FORMAT_VERSION}): upgrade lclm-rag")
        return cls(**d)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "LatentConfig":
        path = Path(directory) / CONFIG_NAME
        if not Path(directory).is_dir():
            raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
        if not path.exists():
            inner = next((path.parent / sub for sub in ("model", "final", "checkpoint/model")
                          if (path.parent / sub / CONFIG_NAME).exists()), None)
            hint = f" (a training run or candidate: its model is {str(inner)!r})" if inner else ""
            raise CheckpointError(f"checkpoint {str(directory)!r} has no {CONFIG_NAME}{hint}")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} is not a checkpoint config: a JSON object is expected, got {type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a valid checkpoint config: {exc}") from exc
