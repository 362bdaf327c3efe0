"""QA scores, read together: answer contained, SQuAD exact match and F1, mean answer length (a
model that "contains" more answers by talking longer has not improved), and where answers go
wrong (invented rather than read from the passage; numbers; names)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


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


def is_numeric_answer(answer: str) -> bool:
    return any(ch.isdigit() for ch in answer)


def is_capitalised_answer(answer: str) -> bool:
    return answer.strip()[:1].isupper()


def in_passage(prediction: str, passage: str) -> bool:
    """Does the (normalised) answer occur in the (normalised) passage? An empty answer does not."""
    pred = normalize_answer(prediction)
    return bool(pred) and f" {pred} " in f" {normalize_answer(passage)} "


@dataclass
class QAScores:
    """Scores of one mode. The diagnostics say where answers go wrong: ``not_in_passage`` is the
    share of answers found nowhere in the gold passage (invented rather than read), and
    ``numeric_em`` / ``capitalised_em`` are EM over the questions whose first gold answer holds a
    digit / starts with a capital (names, places), counted in ``numeric_n`` / ``capitalised_n``."""

    mode: str
    n: int
    answer_contained: float
    exact_match: float
    f1: float
    mean_answer_words: float
    seconds_per_question: float
    not_in_passage: float | None = None
    numeric_n: int = 0
    numeric_em: float | None = None  # None: no such question in the sample
    capitalised_n: int = 0
    capitalised_em: float | None = None
    passage_positions: float | None = None  # mean prompt positions the passage takes (gold evaluation)

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def _subset_mean(values: list[float], keep: list[bool]) -> tuple[int, float | None]:
    chosen = [v for v, k in zip(values, keep) if k]
    return len(chosen), (sum(chosen) / len(chosen) if chosen else None)


def score_predictions(mode: str, predictions: Sequence[str], records: Sequence[dict], seconds: float) -> QAScores:
    n = len(records)
    answers = [r["answers"] for r in records]
    em = [exact_match(p, a) for p, a in zip(predictions, answers)]
    numeric_n, numeric_em = _subset_mean(em, [is_numeric_answer(a[0]) for a in answers])
    capitalised_n, capitalised_em = _subset_mean(em, [is_capitalised_answer(a[0]) for a in answers])
    return QAScores(
        mode=mode,
        n=n,
        answer_contained=sum(answer_contained(p, a) for p, a in zip(predictions, answers)) / n,
        exact_match=sum(em) / n,
        f1=sum(f1_score(p, a) for p, a in zip(predictions, answers)) / n,
        mean_answer_words=sum(len(p.split()) for p in predictions) / n,
        seconds_per_question=seconds / n,
        not_in_passage=sum(not in_passage(p, r["context"]) for p, r in zip(predictions, records)) / n,
        numeric_n=numeric_n, numeric_em=numeric_em, capitalised_n=capitalised_n, capitalised_em=capitalised_em,
    )
