"""Query-time logic, framework-free: skim every passage as latents, expand the best to raw text.

Nothing here runs the encoder: passages arrive with their stored latents.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lclm_rag.errors import InputError
from lclm_rag.model import LatentContextModel
from lclm_rag.skim import skim_attention, skim_probe

POLICIES = ("score", "lexical", "fused", "attention", "skim")  # attention: the decoder's calibrated skim of the
# all-latent prompt; skim: a probe fitted on a training split over that skim's heads, BM25 and the score (`lclm_rag.skim`)
FUSED_SCORE_WEIGHT = 0.5  # fused = z(BM25) + 0.5 z(retrieval score): the weight chosen on squadshifts_new_wiki


@dataclass
class Passage:
    """A retrieved passage as the decoder sees it."""

    id: str
    text: str
    score: float | None
    latents: torch.Tensor | None  # encoder-side latents (None: only usable expanded)
    latent_source: str = "stored"  # "stored" (from the collection) or "computed" (compressed on the fly)
    doc_id: str | None = None  # the document the passage was cut from, where known


@dataclass
class Plan:
    """Which passages go in as latents, which expanded, which dropped to meet a budget."""

    order: list[int]  # passage indices in prompt order (retrieval order)
    expanded: set[int] = field(default_factory=set)
    dropped: set[int] = field(default_factory=set)
    prompt_positions: int = 0


_WORD = re.compile(r"\w+")


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


def rank_for_expansion(question: str, passages: Sequence[Passage], policy: str,
                       model: LatentContextModel | None = None) -> list[int]:
    """Passage indices, most worth expanding first.

    ``score``: retrieval order; ``lexical``: BM25 of the question over the retrieved texts;
    ``fused``: both, each standardised over the retrieved set (exact names and numbers from BM25,
    paraphrase from the dense score); ``attention``: how much the decoder, reading every passage as latents,
    attends to each one from the question's positions, less what it attends there when asked a
    content-free question (one prefill of the passages, two of the question); ``skim``: the same
    skim's masses per layer and head, weighed by the model's fitted probe beside BM25 and the
    retrieval score. Passages without latents rank first under both: they are expanded anyway.
    """
    if policy not in POLICIES:
        raise InputError(f"expand policy must be one of {POLICIES}, got {policy!r}")
    if policy == "score":
        keys = [p.score if p.score is not None else -math.inf for p in passages]
    elif policy == "lexical":
        keys = lexical_relevance(question, [p.text for p in passages])
    elif policy == "fused":
        keys = fused_relevance(lexical_relevance(question, [p.text for p in passages]),
                               [p.score if p.score is not None else 0.0 for p in passages])
    else:
        if model is None:
            raise InputError(f"the {policy} policy needs the model")
        probe = skim_probe(model) if policy == "skim" else None
        with_latents = [i for i, p in enumerate(passages) if p.latents is not None]
        keys = [math.inf] * len(passages)
        if with_latents:
            heads = skim_attention(model, question, [passages[i].latents for i in with_latents])
            if probe is None:
                relevance = heads.mean((0, 1)).tolist()
            else:
                read = [passages[i] for i in with_latents]
                relevance = probe.scores(heads, lexical_relevance(question, [p.text for p in read]), [p.score for p in read])
            for i, r in zip(with_latents, relevance, strict=True):
                keys[i] = r
    return sorted(range(len(passages)), key=lambda i: (-keys[i], i))


@dataclass(frozen=True)
class PrefillCost:
    """Time to first token as ``fixed_s + per_position_s * positions`` on one model's engine."""

    fixed_s: float
    per_position_s: float

    def positions_within(self, seconds: float) -> int:
        return max(0, int((seconds - self.fixed_s) / self.per_position_s))


_PREFILL_COSTS: dict[int, PrefillCost] = {}


def prefill_cost(model: LatentContextModel, short: int = 64, long: int = 512) -> PrefillCost:
    """Measured once per loaded model and engine: the first token's time after a ``short`` and a ``long`` prompt
    (best of 2 each), a line through both. Prefill dominates time to first token, and it grows
    about linearly with the prompt at these lengths, so a latency budget becomes a position budget."""
    from lclm_rag.engine import GenerationSettings

    key = id(model.decoder.engine)  # another engine (use_engine) is measured again
    if key not in _PREFILL_COSTS:
        settings = GenerationSettings(max_new_tokens=1)

        def ttft(positions: int) -> float:
            table = model.decoder.model.get_input_embeddings().weight
            prompt = table[:1].detach().expand(positions, -1).clone()  # content does not change the cost
            best = math.inf
            for _ in range(2):
                start = time.perf_counter()
                _, first = model.decoder.engine.timed(prompt, settings)
                best = min(best, first - start)
            return best

        if model.decoder.max_positions is not None:
            long = min(long, model.decoder.max_positions - 1)
        t_short, t_long = ttft(short), ttft(long)
        slope = max((t_long - t_short) / (long - short), 1e-7)
        _PREFILL_COSTS[key] = PrefillCost(max(t_short - slope * short, 0.0), slope)
    return _PREFILL_COSTS[key]


def plan_prompt(model: LatentContextModel, question: str, passages: Sequence[Passage], expand: int = 0,
                policy: str = "score", token_budget: int | None = None, latency_budget_s: float | None = None) -> Plan:
    """Choose the expanded passages; with ``token_budget`` fit the prompt into that many positions.

    With a budget, ``expand=n`` puts the n best-ranked passages in as text ahead of the lower-ranked
    ones' latents, which are dropped from the bottom to make room (one passage as text is worth more
    than a few as latents: F1 0.315 against 0.166 on SQuAD, ``docs/benchmarks.md``); ``expand=0``
    expands as many as fit, the best first, and drops latents only if even they do not fit.
    ``latency_budget_s`` (time to first token) becomes a position budget at the engine's measured
    prefill cost (``prefill_cost``); with both, the tighter one holds."""
    if latency_budget_s is not None:
        if latency_budget_s <= 0:
            raise InputError(f"latency_budget_s must be > 0, got {latency_budget_s}")
        within = prefill_cost(model).positions_within(latency_budget_s)
        token_budget = within if token_budget is None else min(token_budget, within)
    if not passages:
        raise InputError("no passages to answer from: the engine never answers without context")
    if expand < 0:
        raise InputError(f"expand must be >= 0, got {expand}")
    ranking = rank_for_expansion(question, passages, policy, model) if expand or token_budget is not None else list(range(len(passages)))
    overhead = sum(s.positions for s in model.decoder.qa_segments(question, []))
    context = model.decoder.max_positions
    if context is not None and overhead >= context:
        raise InputError(f"the question takes {overhead:,} decoder positions; the decoder reads {context:,} in all "
                         "(shorten the question)")
    plan = Plan(order=list(range(len(passages))))
    must_expand = {i for i, p in enumerate(passages) if p.latents is None}
    if token_budget is None:
        plan.expanded = set(ranking[:expand]) | must_expand
    else:
        def fits(expanded: set[int], dropped: set[int]) -> bool:
            """Does the prompt fit? Counted on the prompt itself: tokenizing it takes ~2 ms, decoding it seconds."""
            slots = [p.text if i in expanded else p.latents for i, p in enumerate(passages) if i not in dropped]
            return model.prompt_positions(model.decoder.qa_segments(question, slots)) <= token_budget

        plan.expanded = set(must_expand)
        for rank, i in enumerate(ranking):  # the ``expand`` best go in as text ahead of lower-ranked latents
            if len(plan.expanded - must_expand) >= expand:
                break
            if i not in plan.expanded and fits(plan.expanded | {i}, set(ranking[rank + 1:])):
                plan.expanded.add(i)
        for worst in reversed(ranking):  # drop from the bottom until everything fits
            if fits(plan.expanded, plan.dropped):
                break
            plan.dropped.add(worst)
        if len(plan.dropped) == len(passages):
            raise InputError(f"token_budget={token_budget} cannot hold even one passage as latents")
        for i in ranking if not expand else ():  # expand=0: as many as fit, the best first, dropping none
            if i not in plan.dropped and i not in plan.expanded and fits(plan.expanded | {i}, plan.dropped):
                plan.expanded.add(i)
    plan.order = [i for i in plan.order if i not in plan.dropped]
    return plan


def build_segments(model: LatentContextModel, question: str, passages: Sequence[Passage], plan: Plan):
    slots = [passages[i].text if i in plan.expanded else passages[i].latents for i in plan.order]
    segments = model.decoder.qa_segments(question, slots)
    plan.prompt_positions = model.prompt_positions(segments)
    return segments


def generate(model: LatentContextModel, segments, max_new_tokens: int = 64, **gen) -> str:
    return model.decoder.generate_from_segments([segments], max_new_tokens=max_new_tokens, **gen)[0]


def stream(model: LatentContextModel, segments, max_new_tokens: int = 64, **gen) -> Iterator[str]:
    return model.decoder.stream_from_segments(segments, max_new_tokens=max_new_tokens, **gen)


@dataclass
class AutoDecision:
    """What ``decide_expansion`` chose: the plan to answer from and why."""

    plan: Plan
    segments: list
    confidence: float  # of the all-latent answer
    latent_answer: str  # the all-latent answer (the answer itself when nothing was expanded)
    reason: str  # "" (answered from latents) or why passages were expanded

    @property
    def expanded(self) -> bool:
        return bool(self.reason)


def decide_expansion(model: LatentContextModel, question: str, passages: Sequence[Passage], *, threshold: float | None,
                     expand: int = 1, policy: str = "attention", token_budget: int | None = None,
                     latency_budget_s: float | None = None, max_new_tokens: int = 64, answer: Callable[[list], str] | None = None, **gen) -> AutoDecision:
    """Expand only when the decoder is unsure (``expand="auto"``): answer from latents first.

    The all-latent answer's confidence (exp of its mean token log-probability) is compared with
    ``threshold``: below it, the ``expand`` best passages under ``policy`` go in as text (the
    caller answers again from the returned segments). ``threshold`` None or 0 never expands; 1.0
    always does. The decision is made before any token of the final answer is produced, so a
    streamed answer never restarts. ``answer`` (segments -> text) replaces the default greedy
    generation of the all-latent answer, e.g. to time it.
    """
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InputError(f"the auto-expand threshold must be in [0, 1], got {threshold}")
    skim_plan = plan_prompt(model, question, passages, expand=0, token_budget=token_budget, latency_budget_s=latency_budget_s)
    skim_plan.expanded = {i for i in skim_plan.expanded if passages[i].latents is None}  # the skim reads latents only
    segments = build_segments(model, question, passages, skim_plan)
    text = answer(segments) if answer else generate(model, segments, max_new_tokens=max_new_tokens, **gen)
    confidence = model.decoder.answer_confidence(segments, text)
    if not threshold or (confidence >= threshold and threshold < 1.0):
        return AutoDecision(skim_plan, segments, confidence, text, "")
    plan = plan_prompt(model, question, passages, expand=expand, policy=policy, token_budget=token_budget,
                       latency_budget_s=latency_budget_s)
    segments = build_segments(model, question, passages, plan)
    return AutoDecision(plan, segments, confidence, text, f"confidence {confidence:.3f} < threshold {threshold:g}")
