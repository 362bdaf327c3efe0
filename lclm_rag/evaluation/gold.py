"""Reading only: QA with each question's gold passage, as text, as latents, or another passage's latents."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

from lclm_rag.data import sample_records
from lclm_rag.evaluation.metrics import QAScores, score_predictions
from lclm_rag.store.quantize import as_stored

GOLD_MODES = ("none", "text", "text-base", "latent", "latent-control")


def evaluate_gold_passage(model, records: Sequence[dict], mode: str, max_new_tokens: int = 32, batch_size: int = 8,
                          latent_dtype: str | None = None) -> tuple[QAScores, list[str]]:
    """QA with the gold passage only (reading, not retrieval). Modes:

    ``none`` no context; ``text`` full passage as text; ``text-base`` the same with the decoder's
    adapters disabled (the base decoder); ``latent`` the passage compressed; ``latent-control``
    the latents of *another* question's passage (what the decoder answers from its prior).
    ``latent_dtype`` ("float16", "uint8"): latents as a collection of that type gives them back
    (None: as the encoder made them).
    """
    if mode not in GOLD_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {GOLD_MODES}")
    base = model.decoder.base() if mode == "text-base" else contextlib.nullcontext()
    preds: list[str] = []
    start = time.perf_counter()
    with base:
        for b in range(0, len(records), batch_size):
            batch = records[b : b + batch_size]
            questions = [r["question"] for r in batch]
            if mode == "none":
                contexts = [[] for _ in batch]
            elif mode in ("text", "text-base"):
                contexts = [[r["context"]] for r in batch]
            else:
                latents = model.compress([r["context"] for r in batch])
                if mode == "latent-control":
                    latents = latents[1:] + latents[:1] if len(latents) > 1 else model.compress([records[(b + len(batch)) % len(records)]["context"]])
                if latent_dtype is not None:
                    latents = [as_stored(lat, latent_dtype) for lat in latents]
                contexts = [[lat] for lat in latents]
            preds.extend(model.answer(questions, contexts, max_new_tokens=max_new_tokens))
    return score_predictions(mode, preds, records, time.perf_counter() - start), preds


def run_gold_eval(model, data: str | Path, modes: Sequence[str], limit: int, seed: int = 0, max_new_tokens: int = 32,
                  output: str | Path | None = None, latent_dtype: str | None = None) -> dict:
    """Every mode on the same fixed sample of questions; optional JSON output with predictions."""
    records = sample_records(data, limit, seed=seed)
    result = {"data": str(data), "n": len(records), "seed": seed, "max_new_tokens": max_new_tokens,
              "fingerprint": model.fingerprint(), "ratio": model.config.ratio, "latent_dtype": latent_dtype,
              "scores": [], "predictions": {}}
    for mode in modes:
        scores, preds = evaluate_gold_passage(model, records, mode, max_new_tokens=max_new_tokens, latent_dtype=latent_dtype)
        result["scores"].append(scores.as_dict())
        result["predictions"][mode] = preds
        if output:  # after every mode: an interrupted run keeps what it measured
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(result, indent=2))
    return result
