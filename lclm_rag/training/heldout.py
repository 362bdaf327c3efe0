"""Held-out measures of a checkpoint under a recipe: restoration of every held-out passage of its
own split, and the answer loss on held-out questions (how much a run has learnt per example)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from lclm_rag.data import load_jsonl
from lclm_rag.errors import ConfigError
from lclm_rag.evaluation.restoration import restoration_accuracy
from lclm_rag.model import LatentContextModel
from lclm_rag.training.examples import Example, chunk_texts, corpus_split, qa_example, stage_qa_example
from lclm_rag.training.objectives import TrainingModule
from lclm_rag.training.recipe import TrainConfig


def heldout_qa_examples(cfg: TrainConfig, model: LatentContextModel, questions: int) -> tuple[list[Example], list[Example]]:
    """``questions`` questions (a seeded sample) of the recipe's ``qa_eval_file`` (never trained on),
    each over its passage and distractors drawn as its last QA stage draws them (same count, same
    sidecar); and their controls: each question over the passages of the next question on another
    passage (shuffled anew)."""
    stage = next((s for s in reversed(cfg.stages) if s.name == "qa"), None)
    if stage is None or not cfg.qa_eval_file:
        raise ConfigError("the held-out answer loss needs a qa stage and a qa_eval_file in the recipe")
    answerable = [r for r in load_jsonl(cfg.qa_eval_file) if r.get("answers")]
    pool = sorted({r["context"] for r in answerable})
    rng = random.Random(f"heldout-{cfg.seed}")
    records = rng.sample(answerable, min(questions, len(answerable)))
    own = [stage_qa_example(model, stage, r, pool, rng) for r in records]
    swapped = []
    for i, r in enumerate(records):
        n = len(records)
        j = next((k % n for k in range(i + 1, i + n) if records[k % n]["context"] != r["context"]), i)
        other = records[j]["context"]
        rest = [p for p in own[j].passages if p not in (other, r["context"])]  # never the question's own passage
        spare = [p for p in pool if p not in (other, r["context"], *rest)]
        rest += rng.sample(spare, min(len(spare), stage.distractors - len(rest)))
        swapped.append(qa_example(model, {**r, "context": other}, rest, len(rest), rng, stage.key_terms))
    return own, swapped


def heldout_answer_loss(cfg: TrainConfig, model: LatentContextModel, questions: int = 200, batch_size: int = 8) -> dict:
    """Teacher-forced loss of the gold answers of ``heldout_qa_examples`` and of their controls.

    Loss falls long before greedy answers change, so two short runs that saw the same number of
    examples are told apart by it (learning per example)."""
    own, swapped = heldout_qa_examples(cfg, model, questions)
    step = TrainingModule(model)
    out = {}
    with torch.no_grad():
        for name, examples in (("answer_loss", own), ("answer_loss_control", swapped)):
            total = 0.0
            for i in range(0, len(examples), batch_size):
                batch = examples[i : i + batch_size]
                total += step(batch, False)[0].item() * len(batch)
            out[name] = round(total / len(examples), 4)
    return {"questions": len(own), **out}


def evaluate_heldout(cfg: TrainConfig, checkpoint: str | Path, batch_size: int = 32, questions: int = 0) -> dict:
    """Restoration accuracy of a checkpoint on every held-out chunk of a recipe's corpus split.

    The split is the recipe's own (seeded), so a checkpoint trained with that recipe, or one it
    started from, is measured on passages it never saw; in-training evals use only the first
    ``eval_passages``. Chunks go in full batches of ``batch_size`` (the control gives each chunk
    the latents of the next one in its batch) and the batch accuracies are averaged. ``questions``:
    also the held-out answer loss on that many questions (``heldout_answer_loss``).
    """
    model = LatentContextModel.from_pretrained(checkpoint).eval()
    chunks = chunk_texts(corpus_split(cfg)[0], model.compressor.tokenizer, cfg.chunk_tokens)  # no training data loaded
    batches = [chunks[i : i + batch_size] for i in range(0, len(chunks) - batch_size + 1, batch_size)]
    if not batches:
        raise ConfigError(f"the recipe holds out {len(chunks)} chunks, fewer than one batch of {batch_size}")
    with torch.no_grad():
        own = [restoration_accuracy(model, b) for b in batches]
        control = [restoration_accuracy(model, b, control=True) for b in batches]
    result = {"passages": batch_size * len(batches), "ratio": model.config.ratio,
              "fingerprint": model.compressor.fingerprint(),
              "restoration_acc": round(float(np.mean(own)), 4), "control": round(float(np.mean(control)), 4)}
    return {**result, **heldout_answer_loss(cfg, model, questions)} if questions else result
