"""Expansion policies: which retrieved passages are worth reading as raw text, best first.

A policy is a ranker registered here by name; `lclm_rag.query_config.QueryConfig`, the command
line's ``--policy`` choices and the evaluation all read the names from ``POLICIES``, so a new
ranker is one function and one decorator. Importing this module loads no model (the command line
reads the names before parsing), so the rankers that ask the decoder import it when they run.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from lclm_rag.errors import InputError

if TYPE_CHECKING:
    import torch

    from lclm_rag.model import LatentContextModel


class Passage(Protocol):
    """What a ranker reads of a retrieved passage (`lclm_rag.planning.Passage` is one)."""

    text: str
    score: float | None
    latents: Any  # encoder-side latents, or None (only usable expanded)


Ranker = Callable[[str, "Sequence[Passage]", "LatentContextModel | None"], list[float]]  # question, passages, model -> keys
RANKERS: dict[str, Ranker] = {}
FUSED_SCORE_WEIGHT = 0.5  # fused = z(BM25) + 0.5 z(retrieval score): the weight chosen on squadshifts_new_wiki
_WORD = re.compile(r"\w+")


def ranker(name: str) -> Callable[[Ranker], Ranker]:
    """Register a policy: ``keys(question, passages, model)``, higher first, one per passage."""

    def register(fn: Ranker) -> Ranker:
        RANKERS[name] = fn
        return fn

    return register


def lexical_relevance(question: str, texts: Sequence[str]) -> list[float]:
    """BM25 of the question against the retrieved set: a query-aware signal that catches exact
    names and numbers a dense embedding blurs, computed on text already in hand (no model call)."""
    docs = [[w.lower() for w in _WORD.findall(t)] for t in texts]
    query = {w.lower() for w in _WORD.findall(question)}
    n = len(docs)
    avg = sum(len(d) for d in docs) / max(n, 1)
    df = Counter(w for d in docs for w in set(d))
    scores = []
    for d in docs:
        tf = Counter(d)
        s = 0.0
        for w in query:
            if tf[w]:
                idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
                s += idf * tf[w] * 2.2 / (tf[w] + 1.2 * (0.25 + 0.75 * len(d) / max(avg, 1)))
        scores.append(s)
    return scores


def _standardised(values: Sequence[float]) -> list[float]:
    mean, spread = statistics.fmean(values), statistics.pstdev(values)
    return [(v - mean) / spread if spread > 0 else 0.0 for v in values]


def fused_relevance(bm25: Sequence[float], scores: Sequence[float]) -> list[float]:
    """The ``fused`` policy's keys: BM25 and the retrieval score, each standardised over the retrieved set."""
    return [b + FUSED_SCORE_WEIGHT * d for b, d in zip(_standardised(bm25), _standardised(scores), strict=True)]


@ranker("score")
def _by_score(question: str, passages: Sequence[Passage], model: LatentContextModel | None) -> list[float]:
    """Retrieval order."""
    return [p.score if p.score is not None else -math.inf for p in passages]


@ranker("lexical")
def _by_bm25(question: str, passages: Sequence[Passage], model: LatentContextModel | None) -> list[float]:
    """BM25 of the question over the retrieved texts."""
    return lexical_relevance(question, [p.text for p in passages])


@ranker("fused")
def _by_fused(question: str, passages: Sequence[Passage], model: LatentContextModel | None) -> list[float]:
    """BM25 and the dense score, each standardised: exact names and numbers from one, paraphrase from the other."""
    return fused_relevance(lexical_relevance(question, [p.text for p in passages]),
                           [p.score if p.score is not None else 0.0 for p in passages])


def question_attention(model: LatentContextModel, question: str, latents: Sequence[torch.Tensor]) -> torch.Tensor:
    """(layers, heads, passages) attention of the question's positions on each passage's latents in
    the all-latent prompt, less that of a content-free question (the passages prefilled once for both)."""
    from lclm_rag.prompt import CONTENT_FREE_QUESTION

    segments = model.decoder.qa_segments(question, latents)
    context = model.decoder.max_positions
    positions = model.prompt_positions(segments)
    if context is not None and positions >= context:
        raise InputError(f"the {len(latents)} passages as latents take {positions:,} decoder positions; the decoder reads "
                         f"{context:,}: retrieve fewer (--top-k) or rank them without the decoder (--policy score, lexical or fused)")
    return model.decoder.latent_attention(segments, model.decoder.qa_segments(CONTENT_FREE_QUESTION, latents), per_head=True)


def _decoder_keys(question: str, passages: Sequence[Passage], model: LatentContextModel | None, probe: bool) -> list[float]:
    """Keys from the decoder's attention to each latent passage; passages without latents rank first
    (they are expanded anyway)."""
    if model is None:
        raise InputError(f"the {'skim' if probe else 'attention'} policy needs the model")
    with_latents = [i for i, p in enumerate(passages) if p.latents is not None]
    keys = [math.inf] * len(passages)
    if with_latents:
        fitted = model.require_skim_probe() if probe else None
        heads = question_attention(model, question, [passages[i].latents for i in with_latents])
        if fitted is None:
            relevance = heads.mean((0, 1)).tolist()
        else:
            read = [passages[i] for i in with_latents]
            relevance = fitted.scores(heads, lexical_relevance(question, [p.text for p in read]), [p.score for p in read])
        for i, r in zip(with_latents, relevance, strict=True):
            keys[i] = r
    return keys


@ranker("attention")
def _by_attention(question: str, passages: Sequence[Passage], model: LatentContextModel | None) -> list[float]:
    """How much the decoder, reading every passage as latents, attends to each from the question's
    positions, less what it attends there when asked a content-free question."""
    return _decoder_keys(question, passages, model, probe=False)


@ranker("skim")
def _by_skim(question: str, passages: Sequence[Passage], model: LatentContextModel | None) -> list[float]:
    """The same attention per layer and head, weighed by the checkpoint's fitted probe beside BM25 and the score."""
    return _decoder_keys(question, passages, model, probe=True)


POLICIES = tuple(RANKERS)  # score, lexical, fused, attention, skim


def rank_for_expansion(question: str, passages: Sequence[Passage], policy: str,
                       model: LatentContextModel | None = None) -> list[int]:
    """Passage indices, most worth expanding first (ties in retrieval order)."""
    if policy not in RANKERS:
        raise InputError(f"expand policy must be one of {POLICIES}, got {policy!r}")
    keys = RANKERS[policy](question, passages, model)
    return sorted(range(len(passages)), key=lambda i: (-keys[i], i))
