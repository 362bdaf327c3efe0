"""Paired comparison of two evaluation results on the same questions, with standard errors."""

from __future__ import annotations

from pathlib import Path

import torch

from lclm_rag.data import check_qa_records, sample_records
from lclm_rag.errors import InputError
from lclm_rag.evaluation.metrics import answer_contained, exact_match, f1_score

PAIRED_METRICS = {"answer_contained": answer_contained, "exact_match": exact_match, "f1": f1_score,
                  "answer_words": lambda prediction, _answers: float(len(prediction.split()))}


def paired_comparison(new: dict, old: dict, mode: str = "latent", old_mode: str | None = None,
                      data: str | Path | None = None) -> list[dict]:
    """Per-question differences ``new - old`` on the same questions, with their standard errors.

    Two checkpoints that answer the same questions are compared on each question, not on two
    independent means: the standard error of the paired difference is what says whether a gain
    of a point or two is more than the noise of 500 questions. ``new`` and ``old`` are results
    written by ``lclm-rag eval --output`` (gold or RAG); ``mode`` names the predictions to read in
    ``new`` and ``old_mode`` (default: the same) in ``old``, so a latent row can be set against
    a text row. ``data`` overrides the data file recorded in the results (they record the path
    as it was given, relative to where the evaluation ran).
    """
    old_mode = old_mode or mode
    for label, result in (("new", new), ("old", old)):
        if not isinstance(result, dict) or not isinstance(result.get("predictions"), dict):
            raise InputError(f"the {label} result is not an `lclm-rag eval --output` file (no predictions object)")
        if not isinstance(result.get("n"), int) or not isinstance(result.get("seed"), int):
            raise InputError(f"the {label} result records no whole-number n and seed: not an `lclm-rag eval --output` file")
    for label, result, m in (("new", new, mode), ("old", old, old_mode)):
        if m not in result.get("predictions", {}):
            raise InputError(f"the {label} result has no predictions for mode {m!r}; it has {sorted(result.get('predictions', {}))}")
    differs = [k for k in ("n", "seed") if new.get(k) != old.get(k)]
    if Path(str(new.get("data"))).name != Path(str(old.get("data"))).name:
        differs.append("data")
    if differs:
        raise InputError("the two results did not answer the same questions: "
                         + ", ".join(f"{k} {new.get(k)!r} vs {old.get(k)!r}" for k in differs))
    path = Path(data or new["data"])
    if not path.is_file():
        raise InputError(f"{path}: no such file (the results' data file); pass the data file to compare them")
    records = check_qa_records(sample_records(path, new["n"], seed=new["seed"]), path)
    predictions = {"new": new["predictions"][mode], "old": old["predictions"][old_mode]}
    for label, preds in predictions.items():
        if not isinstance(preds, list) or not all(isinstance(p, str) for p in preds):
            raise InputError(f"the {label} result's predictions are not a list of answers")
        if len(preds) != len(records):
            raise InputError(f"the {label} result has {len(preds)} predictions for {len(records)} questions (an unfinished run?)")
    rows = []
    for name, metric in PAIRED_METRICS.items():
        values = {label: torch.tensor([metric(p, r["answers"]) for p, r in zip(preds, records)], dtype=torch.float64)
                  for label, preds in predictions.items()}
        diffs = values["new"] - values["old"]
        mean = diffs.mean().item()
        se = (diffs.std() / len(diffs) ** 0.5).item() if len(diffs) > 1 else float("nan")
        rows.append({"metric": name, "new": values["new"].mean().item(), "old": values["old"].mean().item(),
                     "difference": mean, "standard_error": se, "in_standard_errors": mean / se if se > 0 else float("nan")})
    return rows
