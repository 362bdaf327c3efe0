"""Training: restoration -> continuation -> instruction (QA) tuning, resumable, one CPU or many GPUs.

Stages (Squid; LCLM; PISCO): the decoder learns to read latents by rebuilding the passage from
them (restoration), continuing it (continuation), then answering questions over several
passages given as latents, loss on the answer only (qa), on gold answers or, as PISCO does, on
the answers a full-text teacher gives (``answers="teacher"``). Which parts train is set per stage.
Devices, mixed precision and DDP come from ``accelerate``.

Two stage options make restoration learnable on a small budget (docs/architecture_search.md):
``alignment`` regresses the projector onto the decoder's own input embeddings of each latent's
tokens (encoder and decoder must share a tokenizer), and a per-stage ``ratio`` lets a run start
at 1:1, where an aligned projector is read at once, and compress step by step (1:1 -> 1:2 -> 1:4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lclm_rag.chunking import chunk_text
from lclm_rag.config import LatentConfig
from lclm_rag.decoder import slot_marker
from lclm_rag.errors import ConfigError
from lclm_rag.data import load_jsonl, load_records, parse_source, sample_records, shared_contexts
from lclm_rag.eval import evaluate_gold_passage, restoration_accuracy
from lclm_rag.model import LatentContextModel

logger = logging.getLogger(__name__)

STAGES = ("alignment", "restoration", "continuation", "qa")
PARTS = ("projector", "boundary", "decoder_lora", "encoder_lora", "encoder", "memory", "pooling")
ENCODER_PARTS = {"encoder_lora", "encoder", "memory", "pooling"}  # parts that shape the latents themselves
DECODER_PARTS = {"boundary", "decoder_lora"}
RESTORE_PROMPT = "Repeat the text above word for word."
CONTINUE_PROMPT = "Continue the text above."
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
    teacher: str = "base"  # answers="teacher": "base" = this decoder without its adapters, or a checkpoint name/path
    teacher_max_new_tokens: int = 32  # length budget of the teacher's answers
    seed: int = 0  # fixes the held-out document split, the eval sample and the example streams
    data_seed: int | None = None  # draw the example streams from this seed instead (keeps `seed`'s split):
    # a run continued from a checkpoint of the same recipe family then sees new examples
    mixed_precision: str = "no"  # "no" on CPU (fp32); "bf16" on GPUs

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        d["stages"] = [StageConfig(**s) for s in d.get("stages", [])]
        if not d["stages"]:
            raise ConfigError("a training config needs at least one stage")
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


# ---------------------------------------------------------------------- examples
@dataclass
class Example:
    passages: list[str]  # compressed into latents, one slot each
    user_message: str  # with slot_marker(i) placeholders
    target: str  # what the decoder must produce (loss only here)
    task: str = "restoration"  # restoration | continuation | qa


def restoration_example(passage: str) -> Example:
    return Example([passage], f"{slot_marker(0)}\n\n{RESTORE_PROMPT}", passage)


def continuation_example(first: str, second: str) -> Example:
    return Example([first], f"{slot_marker(0)}\n\n{CONTINUE_PROMPT}", second, task="continuation")


def qa_example(model: LatentContextModel, record: dict, pool: list[str], distractors: int, rng: random.Random) -> Example:
    passages = [record["context"]] + rng.sample(pool, distractors)
    rng.shuffle(passages)
    return Example(passages, model.decoder.qa_user_message(record["question"], len(passages)), record["answers"][0], task="qa")


def teacher_forced_batch(model: LatentContextModel, examples: list[Example], latents: list[torch.Tensor], per_token: bool = False):
    """Loss (mean over examples of the per-token loss on the target), correct and total tokens (see teacher_forced_loss)."""
    decoder = model.decoder
    prompts, targets = [], []
    cursor = 0
    for ex in examples:
        slots = latents[cursor : cursor + len(ex.passages)]
        cursor += len(ex.passages)
        prompts.append(decoder.embed(decoder.segments(ex.user_message, slots)))
        targets.append(ex.target)
    return teacher_forced_loss(decoder, prompts, targets, per_token=per_token)


def teacher_forced_loss(decoder, prompts: list[torch.Tensor], targets: list[str], per_token: bool = False):
    """Teacher forcing of each target text (+ EOS) after its prompt embeddings; loss on the target only.

    Returns the mean over examples of the per-token loss, and correct and total target tokens;
    with ``per_token``, the correct and total are replaced by one bool tensor per example (is
    each target token, EOS last, the argmax).
    """
    eos = decoder.tokenizer.eos_token_id
    inputs, labels = [], []
    for prompt, target in zip(prompts, targets, strict=True):
        tgt = torch.tensor(decoder.text_ids(target) + [eos], device=prompt.device)
        inputs.append(torch.cat([prompt, decoder.model.get_input_embeddings()(tgt).to(prompt.dtype)]))
        labels.append(torch.cat([torch.full((prompt.shape[0],), -100, device=prompt.device), tgt]))
    embeds, mask = decoder.pad_batch(inputs, side="right")
    label_batch = torch.full(mask.shape, -100, dtype=torch.long, device=mask.device)
    for i, lab in enumerate(labels):
        label_batch[i, : lab.shape[0]] = lab
    logits = decoder.model(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1].float()
    gold = label_batch[:, 1:]
    token_loss = nn.functional.cross_entropy(logits.transpose(1, 2), gold, ignore_index=-100, reduction="none")
    valid = gold != -100
    per_example = (token_loss * valid).sum(1) / valid.sum(1).clamp(min=1)
    hits = (logits.argmax(-1) == gold) & valid
    if per_token:
        return per_example.mean(), [hits[i][valid[i]] for i in range(hits.shape[0])]
    return per_example.mean(), hits.sum().item(), valid.sum().item()


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
    """Wraps the model so DDP sees one forward: examples -> (loss, metric name, metric value)."""

    def __init__(self, model: LatentContextModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, examples: list[Example], encoder_trainable: bool, alignment: bool = False):
        compressor = self.model.compressor
        ids = compressor.tokenize([p for ex in examples for p in ex.passages])
        with torch.set_grad_enabled(encoder_trainable and torch.is_grad_enabled()):
            latents = compressor.encode_ids(ids)
        if alignment:
            dec = self.model.decoder
            predicted = dec.projector(torch.cat(latents).to(dec.projector.fc1.weight.dtype))
            target = torch.cat(alignment_targets(self.model, ids)).to(predicted.dtype)
            cosine = nn.functional.cosine_similarity(predicted.detach(), target).mean().item()
            return nn.functional.mse_loss(predicted, target), "cosine", cosine
        loss, correct, total = teacher_forced_batch(self.model, examples, latents)
        return loss, "token_acc", correct / max(total, 1)


def set_ratio(model: LatentContextModel, ratio: int) -> None:
    """Compress 1 per ``ratio`` tokens from now on (a ratio curriculum).

    Mean pooling has no ratio-shaped weights; concat pooling pools by mean at any other ratio
    than its own, so a 1:1 -> 1:2 -> 1:4 curriculum reaches its trained layer at the last step.
    """
    if ratio == model.config.ratio:
        return
    if model.config.pooling == "memory":
        raise ConfigError("a stage ratio needs mean or concat pooling: memory pooling has ratio-sized parameters")
    config = dataclasses.replace(model.config, ratio=ratio)
    model.config = model.compressor.config = model.decoder.config = config


def part_parameters(model: LatentContextModel, part: str) -> list[nn.Parameter]:
    """The parameters of one trainable part (see ``PARTS``)."""
    dec, comp = model.decoder, model.compressor
    if part == "projector":
        return list(dec.projector.parameters())
    if part == "boundary":
        return [dec.boundary] if dec.boundary is not None else []
    if part == "memory":
        return [comp.memory_embeddings] if comp.memory_embeddings is not None else []
    if part == "pooling":
        return list(comp.concat_pool.parameters()) if comp.concat_pool is not None else []
    if part == "encoder":
        return list(comp.encoder.parameters())
    if part in ("decoder_lora", "encoder_lora"):
        if not getattr(model.config, part):
            raise ConfigError(f"stage trains {part} but the model config has no {part} settings")
        module = dec.model if part == "decoder_lora" else comp.encoder
        return [p for name, p in module.named_parameters() if "lora_" in name]
    raise ConfigError(f"unknown part {part!r} (known: {PARTS})")


def set_trainable(model: LatentContextModel, parts: list[str]) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the named parts; returns the trainable parameters."""
    model.requires_grad_(False)
    for part in parts:
        for p in part_parameters(model, part):
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model: LatentContextModel, stage: StageConfig) -> list[dict]:
    """One optimizer group per trained part, at its own peak lr (``stage.part_lr``) or ``stage.lr``."""
    groups, seen = [], set()
    for part in stage.train:
        params = [p for p in part_parameters(model, part) if id(p) not in seen]  # "encoder" contains "encoder_lora"
        seen.update(id(p) for p in params)
        if params:
            groups.append({"params": params, "lr": stage.part_lr.get(part, stage.lr), "name": part})
    return groups


# ---------------------------------------------------------------------- data
def corpus_split(cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """The recipe's seeded document split: (held-out 1%, training), the same in every run of it."""
    docs = [r for src in cfg.corpus for r in load_records(src)]
    random.Random(cfg.seed).shuffle(docs)
    held_out = max(1, len(docs) // 100) if docs else 0
    return docs[:held_out], docs[held_out:]


def chunk_texts(docs: list[dict], tokenizer, chunk_tokens: int) -> list[str]:
    return [c.text for d in docs for c in chunk_text(d["text"], tokenizer, chunk_tokens)]


class ExampleSource:
    """Deterministic example streams per stage; position = examples consumed (for resume)."""

    def __init__(self, cfg: TrainConfig, model: LatentContextModel) -> None:
        self.cfg, self.model = cfg, model
        tok = model.compressor.tokenizer
        self.eval_docs, train_docs = corpus_split(cfg)
        self.chunks: list[str] = []
        self.pairs: list[tuple[str, str]] = []
        for doc in train_docs:
            pieces = [c.text for c in chunk_text(doc["text"], tok, cfg.chunk_tokens)]
            self.chunks.extend(pieces)
            self.pairs.extend(zip(pieces, pieces[1:]))
        self.heldout_chunks = chunk_texts(self.eval_docs, tok, cfg.chunk_tokens)
        self.eval_chunks = self.heldout_chunks[: cfg.eval_passages]
        self.qa = [r for src in cfg.qa_data for r in load_records(src) if r.get("answers")]
        if cfg.qa_eval_file and self.qa:
            overlap = shared_contexts(self.qa, cfg.qa_eval_file)
            if overlap:
                raise ConfigError(f"qa_data shares {overlap} passages with qa_eval_file {cfg.qa_eval_file}: "
                                  "the evaluation would measure memorisation")
        self.qa_pool = sorted({r["context"] for r in self.qa})

    def example(self, stage_index: int, stage: StageConfig, position: int) -> Example:
        seed = self.cfg.seed if self.cfg.data_seed is None else self.cfg.data_seed
        rng = random.Random(f"{seed}-{stage_index}-{position}")
        if stage.name != "restoration" and rng.random() < stage.mix_restoration:
            return restoration_example(rng.choice(self._need(self.chunks, "corpus")))
        if stage.name in ("restoration", "alignment"):
            return restoration_example(self._need(self.chunks, "corpus")[rng.randrange(len(self.chunks))])
        if stage.name == "continuation":
            return continuation_example(*self._need(self.pairs, "corpus")[rng.randrange(len(self.pairs))])
        record = self._need(self.qa, "qa_data")[rng.randrange(len(self.qa))]
        pool = [c for c in rng.sample(self.qa_pool, min(len(self.qa_pool), stage.distractors + 1)) if c != record["context"]]
        return qa_example(self.model, record, pool, min(stage.distractors, len(pool)), rng)

    @staticmethod
    def _need(items: list, what: str) -> list:
        if not items:
            raise ConfigError(f"this stage needs training data: `{what}` is empty")
        return items


class TeacherAnswers:
    """PISCO's targets: what a full-text teacher answers to the same question over the same passages.

    The teacher reads the passages as text with the student's prompt; its greedy answer replaces the
    gold one as the qa target (an empty answer teaches the student to stop). Answers are generated
    once per example and cached in ``output_dir`` (one file per process), so a resumed run trains
    on the same labels without generating them again. Targets are text, so any decoder can teach.
    """

    def __init__(self, cfg: TrainConfig, student: LatentContextModel, out: Path, rank: int, device) -> None:
        if cfg.teacher == "base":
            self.model, self.context = student, student.decoder.base
        else:
            self.model, self.context = LatentContextModel.from_pretrained(cfg.teacher).to(device).eval(), contextlib.nullcontext
        self.max_new_tokens = cfg.teacher_max_new_tokens
        self.path = out / f"teacher_answers.{rank}.jsonl"
        self.answers: dict[str, str] = {}
        for path in sorted(out.glob("teacher_answers.*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a kill can cut the last line; it is regenerated
                    row = json.loads(line)
                    self.answers[row["key"]] = row["answer"]

    @staticmethod
    def key(example: Example) -> str:
        return hashlib.sha1("\x00".join([example.user_message, *example.passages]).encode()).hexdigest()

    @torch.no_grad()
    def relabel(self, examples: list[Example]) -> list[Example]:
        """The examples with each qa target replaced by the teacher's answer (others unchanged)."""
        missing = {self.key(ex): ex for ex in examples if ex.task == "qa" and self.key(ex) not in self.answers}
        if missing:
            decoder = self.model.decoder
            was_training = decoder.training
            decoder.eval()
            with self.context():
                prompts = [decoder.segments(ex.user_message, ex.passages) for ex in missing.values()]
                texts = decoder.generate_from_segments(prompts, max_new_tokens=self.max_new_tokens)
            decoder.train(was_training)
            with self.path.open("a", encoding="utf-8") as fh:
                for key, text in zip(missing, texts, strict=True):
                    self.answers[key] = text
                    fh.write(json.dumps({"key": key, "answer": text}) + "\n")
        return [dataclasses.replace(ex, target=self.answers[self.key(ex)]) if ex.task == "qa" else ex for ex in examples]


# ---------------------------------------------------------------------- checkpoints
@torch.no_grad()
def _calibrate(model: LatentContextModel, source: "ExampleSource", count: int, seed: int) -> None:
    """Standardise the projector's input with latent statistics of (the same, seeded) training passages."""
    pool = source.chunks or source.qa_pool
    if not pool:
        raise ConfigError("calibration needs training passages: set corpus or qa_data, or calibration_passages=0")
    sample = random.Random(f"{seed}-calibration").sample(pool, min(count, len(pool)))
    latents = model.compressor.compress(sample)
    model.decoder.projector.calibrate(torch.cat(latents))
    logger.info("projector calibrated on %d latents of %d passages", sum(len(z) for z in latents), len(sample))


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _save_checkpoint(out: Path, model: LatentContextModel, optimizer, scheduler, state: dict) -> None:
    tmp = out / "checkpoint.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()}, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    final = out / "checkpoint"
    old = out / "checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)  # a kill at any point leaves checkpoint/ or checkpoint.old/ whole
    shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(out: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):
        if (out / name / "state.json").exists():
            return out / name
    return None


def _scheduler(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, max_steps: int | None = None) -> Path:
    """Run (or resume) all stages; returns the directory of the final checkpoint.

    ``max_steps`` stops after that many optimizer steps in this call (tests, time-boxed runs).
    """
    from accelerate import Accelerator

    out = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    resume = _latest_checkpoint(out)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if resume is not None:
        model = LatentContextModel.from_pretrained(resume / "model")
        state = json.loads((resume / "state.json").read_text())
        if accelerator.is_main_process and (out / "log.jsonl").exists():  # drop steps redone after the checkpoint
            rows = [r for r in load_jsonl(out / "log.jsonl") if r["global_step"] <= state["global_step"]]
            (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        if cfg.init_from:
            model = LatentContextModel.from_pretrained(cfg.init_from, **cfg.model)
        else:
            model = LatentContextModel.from_config(LatentConfig(**cfg.model))
        state = {"stage": 0, "step": 0, "global_step": 0, "elapsed": 0.0}
    source = ExampleSource(cfg, model)
    if resume is None and not cfg.init_from and cfg.calibration_passages:  # a trained projector keeps its statistics
        _calibrate(model, source, cfg.calibration_passages, cfg.seed)
    wrapper = TrainingModule(model)
    log_path = out / "log.jsonl"
    steps_this_call = 0
    world, rank = accelerator.num_processes, accelerator.process_index
    teacher: TeacherAnswers | None = None

    for stage_index in range(state["stage"], len(cfg.stages)):
        stage = cfg.stages[stage_index]
        if stage.ratio is not None:
            set_ratio(model, stage.ratio)
        if stage.name == "alignment":
            check_shared_tokenizer(model)
        params = set_trainable(model, stage.train)
        optimizer = torch.optim.AdamW(param_groups(model, stage), lr=stage.lr, weight_decay=cfg.weight_decay)
        scheduler = _scheduler(optimizer, cfg.warmup_steps, stage.steps)
        ddp_model, optimizer = accelerator.prepare(wrapper, optimizer)
        if resume is not None and state["stage"] == stage_index and state["step"] > 0:
            saved = torch.load(resume / "trainer.pt", weights_only=False)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            _set_rng_state(saved["rng"])
        encoder_trainable = bool(ENCODER_PARTS & set(stage.train))
        if stage.answers == "teacher" and teacher is None:
            teacher = TeacherAnswers(cfg, model, out, rank, accelerator.device)
        model.train()
        t0 = time.perf_counter()
        while state["step"] < stage.steps:
            if max_steps is not None and steps_this_call >= max_steps:
                return out
            step = state["step"]
            base = step * cfg.batch_size * world + rank * cfg.batch_size
            examples = [source.example(stage_index, stage, base + i) for i in range(cfg.batch_size)]
            if stage.answers == "teacher":
                examples = teacher.relabel(examples)
            loss, metric, value = ddp_model(examples, encoder_trainable, stage.name == "alignment")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            state["step"] += 1
            state["global_step"] += 1
            steps_this_call += 1
            if accelerator.is_main_process:
                now = time.perf_counter()
                state["elapsed"] += now - t0
                t0 = now
                record = {
                    "type": "train", "stage": stage.name, "step": state["step"], "global_step": state["global_step"],
                    "ratio": model.config.ratio, "loss": round(loss.item(), 5), metric: round(value, 5),
                    "lr": scheduler.get_last_lr()[0], "samples": state["global_step"] * cfg.batch_size * world,
                    "elapsed_s": round(state["elapsed"], 1),
                }
                with log_path.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                if state["step"] % cfg.eval_every == 0 or state["step"] == stage.steps:
                    _evaluate(model, source, cfg, state, log_path, qa=state["step"] == stage.steps)
                    model.train()
                if state["step"] % cfg.save_every == 0 or state["step"] == stage.steps:
                    done = state["step"] == stage.steps  # a finished stage resumes at the next one
                    snapshot = dict(state, stage=stage_index + 1, step=0) if done else dict(state)
                    _save_checkpoint(out, model, optimizer, scheduler, snapshot)
            accelerator.wait_for_everyone()
        state.update(stage=stage_index + 1, step=0)
        resume = None
    if accelerator.is_main_process:
        model.eval()
        model.save_pretrained(out / "final")
        plot_curves(log_path, out / "curves.png")
    return out / "final"


@torch.no_grad()
def _evaluate(model: LatentContextModel, source: ExampleSource, cfg: TrainConfig, state: dict, log_path: Path, qa: bool) -> None:
    model.eval()
    record = {"type": "eval", "global_step": state["global_step"], "elapsed_s": round(state["elapsed"], 1)}
    if source.eval_chunks:
        record["restoration_acc"] = round(restoration_accuracy(model, source.eval_chunks), 4)
        record["restoration_acc_control"] = round(restoration_accuracy(model, source.eval_chunks, control=True), 4)
    if qa and cfg.qa_eval_file:
        records = sample_records(cfg.qa_eval_file, cfg.qa_eval_samples, seed=cfg.seed)
        scores, _ = evaluate_gold_passage(model, records, "latent")
        record.update({f"qa_{k}": v for k, v in scores.as_dict().items() if k != "mode"})
    logger.info("eval %s", record)
    with log_path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def evaluate_heldout(cfg: TrainConfig, checkpoint: str | Path, batch_size: int = 32) -> dict:
    """Restoration accuracy of a checkpoint on every held-out chunk of a recipe's corpus split.

    The split is the recipe's own (seeded), so a checkpoint trained with that recipe, or one it
    started from, is measured on passages it never saw; in-training evals use only the first
    ``eval_passages``. Chunks go in full batches of ``batch_size`` (the control gives each chunk
    the latents of the next one in its batch) and the batch accuracies are averaged.
    """
    model = LatentContextModel.from_pretrained(checkpoint).eval()
    chunks = chunk_texts(corpus_split(cfg)[0], model.compressor.tokenizer, cfg.chunk_tokens)  # no training data loaded
    batches = [chunks[i : i + batch_size] for i in range(0, len(chunks) - batch_size + 1, batch_size)]
    if not batches:
        raise ConfigError(f"the recipe holds out {len(chunks)} chunks, fewer than one batch of {batch_size}")
    with torch.no_grad():
        own = [restoration_accuracy(model, b) for b in batches]
        control = [restoration_accuracy(model, b, control=True) for b in batches]
    return {"passages": batch_size * len(batches), "ratio": model.config.ratio,
            "fingerprint": model.compressor.fingerprint(),
            "restoration_acc": round(float(np.mean(own)), 4), "control": round(float(np.mean(control)), 4)}


def plot_curves(log_path: str | Path, png_path: str | Path) -> None:
    """Training loss / token accuracy and held-out restoration accuracy (with its control)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_jsonl(log_path)
    train_rows = [r for r in rows if r["type"] == "train" and "token_acc" in r]  # alignment steps log an MSE, not this loss
    eval_rows = [r for r in rows if r["type"] == "eval" and "restoration_acc" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if train_rows:
        x = [r["samples"] for r in train_rows]
        k = max(1, len(train_rows) // 50)
        smooth = np.convolve([r["loss"] for r in train_rows], np.ones(k) / k, mode="valid")  # no edge artefacts
        axes[0].plot(x[k - 1 :], smooth, label=f"train loss (moving average of {k} steps)")
        axes[0].set_xlabel("training samples")
        axes[0].legend()
    if eval_rows:
        x = [r["global_step"] for r in eval_rows]
        axes[1].plot(x, [r["restoration_acc"] for r in eval_rows], "o-", label="restoration acc (own latents)")
        axes[1].plot(x, [r["restoration_acc_control"] for r in eval_rows], "x--", label="control (another passage's latents)")
        last = None  # where each stage (and, in a ratio curriculum, each ratio) starts
        for r in rows:
            if r["type"] == "train" and (r["stage"], r.get("ratio")) != last:
                last = (r["stage"], r.get("ratio"))
                axes[1].axvline(r["global_step"], color="grey", lw=0.6)
                label = r["stage"] + (f" 1:{r['ratio']}" if "ratio" in r else "")
                axes[1].annotate(label, (r["global_step"], 0.02), fontsize=7, color="grey", rotation=90)
        axes[1].set_xlabel("step")
        axes[1].set_ylim(0, 1)
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


def main_from_config(path: str, max_steps: int | None = None) -> Path:
    logging.basicConfig(level=os.environ.get("LCLM_RAG_LOG", "INFO"))
    return train(TrainConfig.load(path), max_steps=max_steps)
