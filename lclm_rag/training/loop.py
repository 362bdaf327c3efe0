"""The training loop: stages in order, resumable from the last checkpoint, accelerate for devices/DDP."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lclm_rag.config import LatentConfig
from lclm_rag.data import load_jsonl, sample_records
from lclm_rag.errors import ConfigError
from lclm_rag.evaluation.gold import evaluate_gold_passage
from lclm_rag.evaluation.restoration import restoration_accuracy
from lclm_rag.model import LatentContextModel
from lclm_rag.training.candidate import read_candidate
from lclm_rag.training.curves import plot_curves
from lclm_rag.training.examples import ExampleSource
from lclm_rag.training.objectives import TrainingModule, check_shared_tokenizer
from lclm_rag.training.parts import param_groups, set_ratio, set_trainable
from lclm_rag.training.recipe import ENCODER_PARTS, TrainConfig
from lclm_rag.training.teacher import TeacherAnswers, TextReaderLogProbs

logger = logging.getLogger(__name__)


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
def train(cfg: TrainConfig, max_steps: int | None = None, resume_from: str | Path | None = None) -> Path:
    """Run (or resume) all stages; returns the directory of the final checkpoint.

    ``max_steps`` stops after that many optimizer steps in this call (tests, time-boxed runs).
    ``resume_from``: a compact candidate of this run (``training.candidate``), used when the output
    directory holds no checkpoint of its own (a fresh clone): the run goes on from its step with
    fresh optimizer moments.
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
    from_candidate = resume is None and resume_from is not None
    if from_candidate:
        model_dir, state = read_candidate(resume_from)
        model = LatentContextModel.from_pretrained(model_dir)
        if accelerator.is_main_process and (Path(resume_from) / "log.jsonl").is_file() and not (out / "log.jsonl").exists():
            shutil.copy(Path(resume_from) / "log.jsonl", out / "log.jsonl")
        logger.info("continuing from candidate %s at stage %d step %d (optimizer moments start afresh)",
                    resume_from, state["stage"], state["step"])
    elif resume is not None:
        model = LatentContextModel.from_pretrained(resume / "model")
        state = json.loads((resume / "state.json").read_text())
        if accelerator.is_main_process and (out / "log.jsonl").exists():  # drop steps redone after the checkpoint
            rows = [r for r in load_jsonl(out / "log.jsonl") if r["global_step"] <= state["global_step"]]
            (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        if cfg.init_from:
            model = LatentContextModel.from_pretrained(cfg.init_from, **cfg.model)
            model.use_skim_probe(None)  # fitted on the reader this run retrains: refit it on the result
            if "projector" in cfg.reinit:
                model.decoder.reset_projector()
        else:
            model = LatentContextModel.from_config(LatentConfig(**cfg.model))
        state = {"stage": 0, "step": 0, "global_step": 0, "elapsed": 0.0}
    source = ExampleSource(cfg, model)
    fresh_projector = not cfg.init_from or "projector" in cfg.reinit  # a trained projector keeps its statistics
    if resume is None and not from_candidate and fresh_projector and cfg.calibration_passages:
        _calibrate(model, source, cfg.calibration_passages, cfg.seed)
    wrapper = TrainingModule(model, unpadded=cfg.unpadded, cache_latents=cfg.cache_latents)
    log_path = out / "log.jsonl"
    steps_this_call = 0
    world, rank = accelerator.num_processes, accelerator.process_index
    teacher: TeacherAnswers | None = None
    reader: TextReaderLogProbs | None = None

    for stage_index in range(state["stage"], len(cfg.stages)):
        stage = cfg.stages[stage_index]
        if stage.ratio is not None:
            set_ratio(model, stage.ratio)
        if stage.name in ("restoration", "qa"):  # the checkpoint reads the sidecar it was trained with
            model.config.sidecar_terms = stage.key_terms
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
        elif from_candidate and state["stage"] == stage_index:
            with warnings.catch_warnings():  # stepping the schedule alone is the point: no optimizer step yet
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                for _ in range(state["step"]):  # the schedule where the run stood
                    scheduler.step()
        encoder_trainable = bool(ENCODER_PARTS & set(stage.train))
        if stage.answers == "teacher" and teacher is None:
            teacher = TeacherAnswers(cfg, model, out, rank, accelerator.device)
        if stage.text_kl and reader is None:
            reader = TextReaderLogProbs(cfg, model, accelerator.device)
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
            reference = reader(examples) if stage.text_kl else None
            loss, metric, value = ddp_model(examples, encoder_trainable, stage.name == "alignment", reference, stage.text_kl)
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
                    _evaluate(model, source, cfg, state, log_path, qa=state["step"] == stage.steps,
                              mode="latent+key-terms" if stage.key_terms else "latent")
                    model.train()
                if state["step"] % cfg.save_every == 0 or state["step"] == stage.steps:
                    done = state["step"] == stage.steps  # a finished stage resumes at the next one
                    snapshot = dict(state, stage=stage_index + 1, step=0) if done else dict(state)
                    _save_checkpoint(out, model, optimizer, scheduler, snapshot)
            accelerator.wait_for_everyone()
        state.update(stage=stage_index + 1, step=0)
        resume, from_candidate = None, False
    if accelerator.is_main_process:
        model.eval()
        model.save_pretrained(out / "final")
        plot_curves(log_path, out / "curves.png")
    return out / "final"


@torch.no_grad()
def _evaluate(model: LatentContextModel, source: ExampleSource, cfg: TrainConfig, state: dict, log_path: Path, qa: bool,
              mode: str = "latent") -> None:
    """Restoration on held-out passages; with ``qa``, gold-passage QA read as ``mode`` (the stage's form)."""
    model.eval()
    record = {"type": "eval", "global_step": state["global_step"], "elapsed_s": round(state["elapsed"], 1)}
    if source.eval_chunks:
        record["restoration_acc"] = round(restoration_accuracy(model, source.eval_chunks), 4)
        record["restoration_acc_control"] = round(restoration_accuracy(model, source.eval_chunks, control=True), 4)
    if qa and cfg.qa_eval_file:
        records = sample_records(cfg.qa_eval_file, cfg.qa_eval_samples, seed=cfg.seed)
        scores, _ = evaluate_gold_passage(model, records, mode)
        record.update({f"qa_{k}": v for k, v in scores.as_dict().items() if k != "mode"})
    logger.info("eval %s", record)
    with log_path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def main_from_config(path: str, max_steps: int | None = None, resume_from: str | None = None) -> Path:
    logging.basicConfig(level=os.environ.get("LCLM_RAG_LOG", "INFO"))
    return train(TrainConfig.load(path), max_steps=max_steps, resume_from=resume_from)


def export_run_candidate(path: str, output: str) -> Path:
    """The latest checkpoint of a recipe's run as a compact candidate (``training.candidate``)."""
    from lclm_rag.training.candidate import export_candidate
    from lclm_rag.training.recipe import load_recipe

    out = Path(TrainConfig.load(path).output_dir)
    checkpoint = _latest_checkpoint(out)
    if checkpoint is None:
        raise ConfigError(f"{out} holds no run checkpoint to export: train first")
    return export_candidate(checkpoint, output, log=out / "log.jsonl", recipe=load_recipe(path))
