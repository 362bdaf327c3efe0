"""Training recipes: the stages of a run and every setting, loaded from JSON/YAML with a ``base``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lclm_rag.data import parse_source
from lclm_rag.errors import ConfigError

STAGES = ("alignment", "restoration", "continuation", "qa")
PARTS = ("projector", "boundary", "decoder_lora", "encoder_lora", "encoder", "memory", "pooling")
ENCODER_PARTS = {"encoder_lora", "encoder", "memory", "pooling"}  # parts that shape the latents themselves
DECODER_PARTS = {"boundary", "decoder_lora"}
REINIT_PARTS = ("projector",)  # parts ``reinit`` can start fresh under an ``init_from`` checkpoint
ANSWER_SOURCES = ("gold", "teacher")


@dataclass
class StageConfig:
    name: str  # "alignment" (projector [+ encoder parts], no decoder) | "restoration" | "continuation" | "qa"
    steps: int  # optimizer steps in this stage
    lr: float = 5e-4  # peak learning rate (linear warmup, cosine decay to 10%)
    train: list[str] = field(default_factory=lambda: ["projector", "boundary", "decoder_lora"])  # parts to train
    distractors: int = 2  # qa: random other passages beside the gold one (shuffled)
    mix_restoration: float = 0.0  # qa/continuation: share of restoration examples mixed in
    part_lr: dict[str, float] = field(default_factory=dict)  # per-part peak lr, e.g. {"decoder_lora": 1e-4} (LCLM: adapter 1e-3, LM 6e-5)
    ratio: int | None = None  # compress 1 per `ratio` tokens in this stage (mean pooling); None: the model's
    answers: str = "gold"  # qa targets: "gold" answers, or "teacher": the full-text teacher's greedy answers (PISCO)
    key_terms: int = 0  # each passage's sidecar: at most this many of its names and numbers as text after its
    #                     latents (lclm_rag.sidecar); 0: latents only
    questions_per_context: int = 1  # qa: consecutive examples asking this many different questions over the
    #                     same passages (same distractors, same order); the unpadded step runs their shared
    #                     prompt once. Divides batch_size; 1: every example draws its own passages
    text_kl: float = 0.0  # qa: weight of KL(text reader || this model) on each answer token, added to the
    #                     cross-entropy: the text reader (TrainConfig.teacher) reads the same prompt with the
    #                     passages as text, so every target position teaches its whole distribution; 0: off

    def __post_init__(self) -> None:
        if self.name not in STAGES:
            raise ConfigError(f"stage name must be one of {STAGES}, got {self.name!r}")
        if self.answers not in ANSWER_SOURCES:
            raise ConfigError(f"stage {self.name}: answers must be one of {ANSWER_SOURCES}, got {self.answers!r}")
        if self.answers == "teacher" and self.name != "qa":
            raise ConfigError(f"answers='teacher' distils question answering: it applies to a qa stage, not {self.name}")
        unknown = set(self.train) - set(PARTS)
        if unknown:
            raise ConfigError(f"stage {self.name}: unknown parts {sorted(unknown)} (known: {PARTS})")
        if self.name == "alignment" and ("projector" not in self.train or set(self.train) & DECODER_PARTS):
            raise ConfigError("the alignment stage trains the projector and, optionally, the parts that make the latents "
                              f"({sorted(ENCODER_PARTS)}); the decoder does not run, got {sorted(self.train)}")
        if isinstance(self.key_terms, bool) or not isinstance(self.key_terms, int) or self.key_terms < 0:
            raise ConfigError(f"stage {self.name}: key_terms must be a count >= 0, got {self.key_terms!r}")
        if isinstance(self.questions_per_context, bool) or not isinstance(self.questions_per_context, int) \
                or self.questions_per_context < 1:
            raise ConfigError(f"stage {self.name}: questions_per_context must be a count >= 1, got {self.questions_per_context!r}")
        if isinstance(self.text_kl, bool) or not isinstance(self.text_kl, (int, float)) or not 0 <= self.text_kl < float("inf"):
            raise ConfigError(f"stage {self.name}: text_kl must be a finite weight >= 0, got {self.text_kl!r}")
        if self.text_kl and self.name != "qa":
            raise ConfigError(f"text_kl distils a text reader's answers: it applies to a qa stage, not {self.name}")
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, int) or self.ratio <= 0):
            raise ConfigError(f"stage {self.name}: ratio must be a positive integer, got {self.ratio!r}")
        stray = set(self.part_lr) - set(self.train)
        if stray:
            raise ConfigError(f"stage {self.name}: part_lr names {sorted(stray)}, which the stage does not train ({self.train})")


@dataclass
class TrainConfig:
    output_dir: str  # checkpoints, log.jsonl, curves.png, final/
    stages: list[StageConfig]
    model: dict[str, Any] = field(default_factory=dict)  # LatentConfig fields for a fresh model
    init_from: str | None = None  # or start from this checkpoint (then `model` holds overrides, e.g. {"ratio": 8})
    reinit: list[str] = field(default_factory=list)  # with init_from: parts that start fresh instead, e.g.
    # ["projector"] to put a new encoder (deeper, bidirectional) under the checkpoint's trained decoder
    calibration_passages: int = 256  # training passages that set a fresh projector's latent standardisation (0: off)
    corpus: list[Any] = field(default_factory=list)  # {"text"} records for restoration/continuation: JSONL paths or dataset specs (lclm_rag.data)
    qa_data: list[Any] = field(default_factory=list)  # {"context","question","answers"} records for qa: JSONL paths or dataset specs
    chunk_tokens: int = 64  # passage length for restoration/continuation
    batch_size: int = 8  # examples per process per step
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 50  # steps between resumable checkpoints
    eval_every: int = 100  # steps between restoration evaluations
    eval_passages: int = 32  # held-out passages for restoration accuracy
    qa_eval_file: str | None = None  # squad_dev.jsonl: evaluation only, never trained on
    qa_eval_samples: int = 50
    teacher: str = "base"  # answers="teacher" and text_kl: "base" = this decoder without its adapters, or a checkpoint
    #                        name/path (its decoder, adapters on, reads the passages as text)
    teacher_max_new_tokens: int = 32  # length budget of the teacher's answers
    seed: int = 0  # fixes the held-out document split, the eval sample and the example streams
    data_seed: int | None = None  # draw the example streams from this seed instead (keeps `seed`'s split):
    # a run continued from a checkpoint of the same recipe family then sees new examples
    mixed_precision: str = "no"  # "no" on CPU (fp32); "bf16" on GPUs
    unpadded: bool = True  # each example teacher-forced in a forward of its own (no padding; the same loss as
    #                        a padded batch); false: one padded batch
    cache_latents: bool = True  # while the compressor is frozen, compute each passage's latents once

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        d["stages"] = [StageConfig(**s) for s in d.get("stages", [])]
        if not d["stages"]:
            raise ConfigError("a training config needs at least one stage")
        for part in d.get("reinit", []):
            if part not in REINIT_PARTS:
                raise ConfigError(f"reinit: {part!r} cannot start fresh (known: {', '.join(REINIT_PARTS)})")
        if d.get("reinit") and not d.get("init_from"):
            raise ConfigError("reinit starts parts of an init_from checkpoint afresh: set init_from, or drop reinit")
        batch = d.get("batch_size", cls.batch_size)
        for stage in d["stages"]:
            if batch % stage.questions_per_context:
                raise ConfigError(f"stage {stage.name}: questions_per_context {stage.questions_per_context} does not divide "
                                  f"batch_size {batch} (a step would split a context's questions)")
            if stage.text_kl and not d.get("unpadded", cls.unpadded):
                raise ConfigError(f"stage {stage.name}: text_kl needs the unpadded step (unpadded: true)")
        for key in ("corpus", "qa_data"):  # JSONL paths stay strings; dataset specs become DatasetSpec
            d[key] = [parse_source(s) for s in d.get(key, [])]
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        """A recipe file; ``"base": "other.json"`` (relative to it) starts from another recipe,
        whose fields this one overrides (dicts merged key by key, lists replaced)."""
        return cls.from_dict(load_recipe(path))


def _read_recipe_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"recipe {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must hold an object of training settings")
    return raw


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def load_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The settings of a recipe with its ``base`` chain resolved."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"recipe {path} is its own base (through {' -> '.join(p.name for p in _seen)})")
    raw = _read_recipe_file(path)
    base = raw.pop("base", None)
    return _merge(load_recipe(path.parent / base, (*_seen, path)), raw) if base else raw
