"""Restoration of a checkpoint on every held-out passage of a recipe's own split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lclm_rag.errors import ConfigError
from lclm_rag.evaluation.restoration import restoration_accuracy
from lclm_rag.model import LatentContextModel
from lclm_rag.training.examples import chunk_texts, corpus_split
from lclm_rag.training.recipe import TrainConfig


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
