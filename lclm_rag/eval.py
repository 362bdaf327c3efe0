"""QA and restoration metrics, and the evaluation loops that use them.

Scores are read together: answer contained, SQuAD exact match and F1, and mean answer length
(a model that "contains" more answers by talking longer has not improved).
"""

from __future__ import annotations

import json
import random
import re
import string
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    def f1(pred: str, gold: str) -> float:
        p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
        common = sum((Counter(p) & Counter(g)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    return max(f1(prediction, a) for a in answers)


def answer_contained(prediction: str, answers: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(a) and normalize_answer(a) in pred for a in answers))


def load_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(json.loads(line))
                if limit is not None and len(out) >= limit:
                    break
    return out


def sample_records(path: str | Path, n: int, seed: int = 0) -> list[dict]:
    """A fixed sample of ``n`` records (same seed, same questions)."""
    records = load_jsonl(path)
    rng = random.Random(seed)
    return rng.sample(records, min(n, len(records)))


@dataclass
class QAScores:
    mode: str
    n: int
    answer_contained: float
    exact_match: float
    f1: float
    mean_answer_words: float
    seconds_per_question: float

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def score_predictions(mode: str, predictions: Sequence[str], records: Sequence[dict], seconds: float) -> QAScores:
    n = len(records)
    answers = [r["answers"] for r in records]
    return QAScores(
        mode=mode,
        n=n,
        answer_contained=sum(answer_contained(p, a) for p, a in zip(predictions, answers)) / n,
        exact_match=sum(exact_match(p, a) for p, a in zip(predictions, answers)) / n,
        f1=sum(f1_score(p, a) for p, a in zip(predictions, answers)) / n,
        mean_answer_words=sum(len(p.split()) for p in predictions) / n,
        seconds_per_question=seconds / n,
    )


GOLD_MODES = ("none", "text", "text-base", "latent", "latent-control")


def evaluate_gold_passage(model, records: Sequence[dict], mode: str, max_new_tokens: int = 32, batch_size: int = 8) -> tuple[QAScores, list[str]]:
    """QA with the gold passage only (reading, not retrieval). Modes:

    ``none`` no context; ``text`` full passage as text; ``text-base`` the same with the decoder's
    adapters disabled (the base decoder); ``latent`` the passage compressed; ``latent-control``
    the latents of *another* question's passage (what the decoder answers from its prior).
    """
    import contextlib

    if mode not in GOLD_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {GOLD_MODES}")
    decoder_lm = model.decoder.model
    base = decoder_lm.disable_adapter() if mode == "text-base" and hasattr(decoder_lm, "disable_adapter") else contextlib.nullcontext()
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
                contexts = [[lat] for lat in latents]
            preds.extend(model.answer(questions, contexts, max_new_tokens=max_new_tokens))
    return score_predictions(mode, preds, records, time.perf_counter() - start), preds


def run_gold_eval(model, data: str | Path, modes: Sequence[str], limit: int, seed: int = 0, max_new_tokens: int = 32,
                  output: str | Path | None = None) -> dict:
    """Every mode on the same fixed sample of questions; optional JSON output with predictions."""
    records = sample_records(data, limit, seed=seed)
    result = {"data": str(data), "n": len(records), "seed": seed, "max_new_tokens": max_new_tokens,
              "fingerprint": model.fingerprint(), "ratio": model.config.ratio, "scores": [], "predictions": {}}
    for mode in modes:
        scores, preds = evaluate_gold_passage(model, records, mode, max_new_tokens=max_new_tokens)
        result["scores"].append(scores.as_dict())
        result["predictions"][mode] = preds
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2))
    return result


@torch.no_grad()
def restoration_accuracy(model, passages: Sequence[str], control: bool = False) -> float:
    """Teacher-forced next-token accuracy of rebuilding each passage from its latents.

    ``control=True`` feeds every passage the latents of another passage: what the decoder
    gets right from its own prior, the number the real score must beat.
    """
    from lclm_rag.train import restoration_example, teacher_forced_batch

    latents = model.compressor.encode_ids(model.compressor.tokenize(passages))
    if control:
        latents = latents[1:] + latents[:1]
    examples = [restoration_example(p) for p in passages]
    _, correct, total = teacher_forced_batch(model, examples, latents)
    return correct / max(total, 1)
