"""What a training step costs: QA examples per hour of a recipe's stage, three ways.

``lclm-rag bench train --config RECIPE`` runs optimizer steps on three copies of the model, step by
step in turn (so a busy machine slows all alike): the padded batch with latents recomputed every
step (the step as it was); the unpadded step with latents cached while the compressor is frozen
(``TrainingModule``), on the same examples; and the unpadded step over examples drawn
``questions_per_context`` at a time (several questions over the same passages, whose shared
prompt runs once). Figures in docs/training.md.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from datetime import datetime, timezone

import torch

from lclm_rag.errors import ConfigError
from lclm_rag.model import LatentContextModel
from lclm_rag.training.examples import ExampleSource
from lclm_rag.training.objectives import TrainingModule
from lclm_rag.training.parts import param_groups, set_ratio, set_trainable
from lclm_rag.training.recipe import ENCODER_PARTS, TrainConfig

VARIANTS = {"padded": {"unpadded": False, "cache_latents": False}, "unpadded": {"unpadded": True, "cache_latents": True},
            "grouped": {"unpadded": True, "cache_latents": True}}


def _model(cfg: TrainConfig) -> LatentContextModel:
    if cfg.init_from:
        return LatentContextModel.from_pretrained(cfg.init_from, **cfg.model)
    from lclm_rag.config import LatentConfig

    return LatentContextModel.from_config(LatentConfig(**cfg.model))


def bench_training(cfg: TrainConfig, steps: int = 6, stage_index: int | None = None, warmup: int = 1,
                   questions_per_context: int = 4) -> dict:
    """Seconds per step and QA examples per hour of one stage (default: the recipe's first QA stage).

    The padded and unpadded variants run ``warmup + steps`` steps of the same examples (each
    question over passages of its own) from the same weights; the grouped variant the same number
    of steps over examples drawn ``questions_per_context`` to a context (the stage's own setting
    when it has one); in turn, only the last ``steps`` timed. The unpadded variant's cache is filled with the examples'
    passages first (not timed): the steady state of a long run, whose QA passages repeat (3,598
    distinct passages in the two SQuADShifts files); the one-time encoding cost is reported beside it.
    """
    if stage_index is None:
        stage_index = next((i for i, s in enumerate(cfg.stages) if s.name == "qa"), 0)
    stage = dataclasses.replace(cfg.stages[stage_index], questions_per_context=1)
    group = cfg.stages[stage_index].questions_per_context if cfg.stages[stage_index].questions_per_context > 1 else questions_per_context
    if cfg.batch_size % group:
        raise ConfigError(f"questions_per_context {group} does not divide the recipe's batch_size {cfg.batch_size}")
    grouped_stage = dataclasses.replace(stage, questions_per_context=group)
    encoder_trainable = bool(ENCODER_PARTS & set(stage.train))
    runs = {}
    for name, options in VARIANTS.items():
        model = _model(cfg)
        if runs:  # the same starting weights (a fresh model's parts are random)
            model.load_state_dict(next(iter(runs.values()))["model"].state_dict())
        if stage.ratio is not None:
            set_ratio(model, stage.ratio)
        params = set_trainable(model, stage.train)
        optimizer = torch.optim.AdamW(param_groups(model, stage), lr=stage.lr)
        runs[name] = {"model": model, "params": params, "optimizer": optimizer, "wrapper": TrainingModule(model, **options),
                      "losses": [], "timed": 0.0, "fill": 0.0}
        model.train()
    source = ExampleSource(cfg, runs["padded"]["model"])
    for name, run in runs.items():
        drawn = grouped_stage if name == "grouped" else stage
        run["batches"] = [[source.example(stage_index, drawn, s * cfg.batch_size + i) for i in range(cfg.batch_size)]
                          for s in range(warmup + steps)]
        run["qa"] = sum(ex.task == "qa" for batch in run["batches"][warmup:] for ex in batch)
        passages = [p for batch in run["batches"] for ex in batch for p in ex.passages]
        if run["wrapper"].cache_latents and not encoder_trainable:
            t = time.perf_counter()
            run["wrapper"].latents(passages, False)
            run["fill"] = time.perf_counter() - t
            run["distinct"] = len(set(passages))
    for i in range(warmup + steps):
        for run in runs.values():
            batch = run["batches"][i]
            t = time.perf_counter()
            loss, _, _ = run["wrapper"](batch, encoder_trainable)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(run["params"], cfg.max_grad_norm)
            run["optimizer"].step()
            run["optimizer"].zero_grad()
            if i >= warmup:
                run["timed"] += time.perf_counter() - t
            run["losses"].append(round(loss.item(), 5))
    result = {"stage": stage.name, "stage_index": stage_index, "batch_size": cfg.batch_size, "steps": steps,
              "questions_per_context": group, "distractors": stage.distractors, "mix_restoration": stage.mix_restoration,
              "key_terms": stage.key_terms, "encoder_trains": encoder_trainable, "rows": [],
              "machine": {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "cores": os.cpu_count(),
                          "processor": platform.processor() or platform.machine(), "torch": torch.__version__}}
    for name, run in runs.items():
        result["rows"].append({
            "variant": name, "seconds_per_step": round(run["timed"] / steps, 3), "qa_examples": run["qa"],
            "qa_examples_per_hour": round(run["qa"] / run["timed"] * 3600), "losses": run["losses"],
            "cache_fill_s_per_passage": round(run["fill"] / run["distinct"], 4) if run["fill"] else None,
        })
    padded = result["rows"][0]["qa_examples_per_hour"]
    for row in result["rows"]:
        row["qa_examples_per_hour_vs_padded"] = round(row["qa_examples_per_hour"] / padded, 2)
    return result


def run_training_benchmark(config: str | None, steps: int = 6, output: str | None = None) -> str:
    """``lclm-rag bench train``: the benchmark of a recipe file, saved as JSON; returns a markdown table."""
    import json
    from pathlib import Path

    from lclm_rag.errors import InputError
    from lclm_rag.evaluation.measure import markdown_table

    if not config:
        raise InputError("bench train needs --config RECIPE (the recipe whose QA stage is timed)")
    result = bench_training(TrainConfig.load(config), steps=steps)
    result["recipe"] = config
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2))
    rows = [{k: v for k, v in r.items() if k != "losses"} for r in result["rows"]]
    return markdown_table(rows) + f"\n\n{steps} timed steps of {result['batch_size']} examples a variant; grouped: " \
        f"{result['questions_per_context']} questions a context"
