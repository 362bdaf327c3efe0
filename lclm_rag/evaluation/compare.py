"""Paired comparison of two evaluation results on the same questions, with standard errors."""

from __future__ import annotations

from pathlib import Path

import torch

from lclm_rag.data import check_qa_records, sample_records
from lclm_rag.errors import InputError
from lclm_rag.evaluation.metrics import (
    answer_contained,
    exact_match,
    f1_score,
    is_capitalised_answer,
    is_numeric_answer,
)

PAIRED_METRICS = {"answer_contained": answer_contained, "exact_match": exact_match, "f1": f1_score,
                  "answer_words": lambda prediction, _answers: float(len(prediction.split()))}
GROUPED_METRICS = ("answer_contained", "f1")  # what a breakdown reports for each group


def answer_position(record: dict) -> str:
    """Which third of its passage the answer first occurs in, by characters ("not in passage" if nowhere).

    Text cut to the latents' size reads a passage's first part only; latents hold all of it. Where
    the answers sit says whether latents lose for what they garble or win for what text leaves out.
    """
    context = record["context"].lower()
    offsets = [context.find(a.lower()) for a in record["answers"] if a.strip()]
    offsets = [o for o in offsets if o >= 0]
    if not offsets:
        return "not in passage"
    return ("first third", "middle third", "last third")[min(2, 3 * min(offsets) // max(len(context), 1))]


def answer_kind(record: dict) -> str:
    """A number (any digit), a name (capitalised) or other, by the first gold answer."""
    answer = record["answers"][0]
    return "number" if is_numeric_answer(answer) else "name" if is_capitalised_answer(answer) else "other"


GROUPINGS = {"answer-position": answer_position, "answer-kind": answer_kind}
GROUP_ORDER = ("first third", "middle third", "last third", "not in passage", "number", "name", "other")


def _paired_row(new: torch.Tensor, old: torch.Tensor) -> dict:
    diffs = new - old
    mean = diffs.mean().item()
    se = (diffs.std() / len(diffs) ** 0.5).item() if len(diffs) > 1 else float("nan")
    return {"new": new.mean().item(), "old": old.mean().item(), "difference": mean, "standard_error": se,
            "in_standard_errors": mean / se if se > 0 else float("nan")}


def paired_comparison(new: dict, old: dict, mode: str = "latent", old_mode: str | None = None,
                      data: str | Path | None = None, by: str | None = None) -> list[dict]:
    """Per-question differences ``new - old`` on the same questions, with their standard errors.

    Two checkpoints that answer the same questions are compared on each question, not on two
    independent means: the standard error of the paired difference is what says whether a gain
    of a point or two is more than the noise of 500 questions. ``new`` and ``old`` are results
    written by ``lclm-rag eval --output`` (gold or RAG); ``mode`` names the predictions to read in
    ``new`` and ``old_mode`` (default: the same) in ``old``, so a latent row can be set against
    a text row. ``data`` overrides the data file recorded in the results (they record the path
    as it was given, relative to where the evaluation ran). ``by`` (a ``GROUPINGS`` name) breaks
    F1 and contained down by group of questions: where in the passage the answer sits, or its kind.
    """
    old_mode = old_mode or mode
    if by is not None and by not in GROUPINGS:
        raise InputError(f"unknown grouping {by!r}; choose from {', '.join(GROUPINGS)}")
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
    values = {name: {label: torch.tensor([metric(p, r["answers"]) for p, r in zip(preds, records)], dtype=torch.float64)
                      for label, preds in predictions.items()} for name, metric in PAIRED_METRICS.items()}
    if by is None:
        return [{"metric": name, **_paired_row(v["new"], v["old"])} for name, v in values.items()]
    groups = [GROUPINGS[by](r) for r in records]
    rows = []
    for group in sorted(set(groups), key=GROUP_ORDER.index):
        keep = torch.tensor([g == group for g in groups])
        rows.extend({by: group, "n": int(keep.sum()), "metric": name, **_paired_row(values[name]["new"][keep], values[name]["old"][keep])}
                    for name in GROUPED_METRICS)
    return rows
