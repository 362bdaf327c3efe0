"""Which retrieved passages go in as latents, which as raw text, which are dropped: the plan.

Nothing here runs the encoder: passages arrive with their stored latents. The ranking of
passages for expansion is a policy (`lclm_rag.policies`); this module fits the prompt into the
decoder's context and any budget, and makes the auto decision. `lclm_rag.rag.LatentRAG` is what
calls it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lclm_rag.engine import PrefillCost
from lclm_rag.errors import InputError
from lclm_rag.model import LatentContextModel
from lclm_rag.policies import rank_for_expansion
from lclm_rag.sidecar import passage_sidecar

logger = logging.getLogger(__name__)


@dataclass
class Passage:
    """A retrieved passage as the decoder sees it."""

    id: str
    text: str
    score: float | None
    latents: torch.Tensor | None  # encoder-side latents (None: only usable expanded)
    latent_source: str = "stored"  # "stored" (from the collection) or "computed" (compressed on the fly)
    doc_id: str | None = None  # the document the passage was cut from, where known
    payload: dict | None = None  # the stored point's fields (doc_id, source, chunk_index, ...), where known


@dataclass
class Plan:
    """Which passages go in as latents, which expanded, which dropped to meet a budget."""

    order: list[int]  # passage indices in prompt order (retrieval order)
    expanded: set[int] = field(default_factory=set)
    dropped: set[int] = field(default_factory=set)
    prompt_positions: int = 0


def prefill_cost(model: LatentContextModel, short: int = 64, long: int = 512) -> PrefillCost:
    """Measured once per decode engine (kept on the engine: another engine is measured again): the
    first token's time after a ``short`` and a ``long`` prompt (best of 2 each), a line through
    both. Prefill dominates time to first token, and it grows about linearly with the prompt at
    these lengths, so a latency budget becomes a position budget."""
    from lclm_rag.engine import GenerationSettings

    engine = model.decoder.engine
    if engine.prefill_cost is None:
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
        engine.prefill_cost = PrefillCost(max(t_short - slope * short, 0.0), slope)
    return engine.prefill_cost


def plan_prompt(model: LatentContextModel, question: str, passages: Sequence[Passage], expand: int = 0,
                policy: str = "score", token_budget: int | None = None, latency_budget_s: float | None = None,
                reserve: int = 0, text_only: bool = False) -> Plan:
    """Choose the expanded passages; with ``token_budget`` fit the prompt into that many positions.

    With a budget, ``expand=n`` puts the n best-ranked passages in as text ahead of the lower-ranked
    ones' latents, which are dropped from the bottom to make room (one passage as text is worth more
    than a few as latents: F1 0.315 against 0.166 on SQuAD, ``docs/benchmarks.md``); ``expand=0``
    expands as many as fit, the best first, and drops latents only if even they do not fit.
    ``latency_budget_s`` (time to first token) becomes a position budget at the engine's measured
    prefill cost (``prefill_cost``); with both, the tighter one holds. ``text_only``: no latents;
    the best-ranked passages go in as text while they fit, the rest are dropped (``expand`` is
    not read).

    The whole planned prompt, with ``reserve`` positions left for the answer, is checked against
    the decoder's context before anything is decoded: a plan that does not fit is fitted as a
    budget of the context would be (a warning says so), and one that cannot hold even one passage
    is refused with the numbers."""
    if latency_budget_s is not None:
        if not math.isfinite(latency_budget_s) or latency_budget_s <= 0:
            raise InputError(f"latency_budget_s must be > 0 and finite, got {latency_budget_s}")
        within = prefill_cost(model).positions_within(latency_budget_s)
        token_budget = within if token_budget is None else min(token_budget, within)
    if not passages:
        raise InputError("no passages to answer from: the engine never answers without context")
    if expand < 0:
        raise InputError(f"expand must be >= 0, got {expand}")
    overhead = sum(s.positions for s in model.decoder.qa_segments(question, []))
    context = model.decoder.max_positions
    if context is not None and overhead >= context:
        raise InputError(f"the question takes {overhead:,} decoder positions; the decoder reads {context:,} in all "
                         "(shorten the question)")
    room = None if context is None else context - reserve

    def positions(expanded: set[int], dropped: set[int]) -> int:
        """The prompt's positions, counted on the prompt itself: tokenizing it takes ~2 ms, decoding it seconds."""
        kept = [i for i in range(len(passages)) if i not in dropped]
        slots = [passages[i].text if i in expanded else passages[i].latents for i in kept]
        return model.prompt_positions(model.decoder.qa_segments(question, slots, sidecar_notes(model, passages, kept, expanded)))

    must_expand = {i for i, p in enumerate(passages) if p.latents is None}
    ranking = rank_for_expansion(question, passages, policy, model) if expand or text_only or token_budget is not None else None
    plan = Plan(order=list(range(len(passages))))
    fitted_to_context = False
    if text_only:
        expand = len(passages)
    if token_budget is None:
        plan.expanded = set((ranking or [])[:expand]) | must_expand
        if room is not None and (planned := positions(plan.expanded, set())) > room:
            logger.warning("the planned prompt takes %d decoder positions; the decoder reads %d, %d of them kept for the "
                           "answer: fitted as a budget of that size (fewer passages expanded, the lowest-ranked latents dropped if need be)",
                           planned, context, reserve)
            token_budget, fitted_to_context = room, True
            ranking = ranking or rank_for_expansion(question, passages, policy, model)
    elif room is not None and token_budget > room:
        token_budget, fitted_to_context = room, True
    if token_budget is not None:
        def fits(expanded: set[int], dropped: set[int]) -> bool:
            return positions(expanded, dropped) <= token_budget

        everything = set(range(len(passages)))
        plan.expanded = set() if text_only else set(must_expand)
        for rank, i in enumerate(ranking):  # the ``expand`` best go in as text ahead of lower-ranked latents
            if len(plan.expanded - must_expand) >= expand:
                break
            below = everything - plan.expanded - {i} if text_only else set(ranking[rank + 1:])
            if i not in plan.expanded and fits(plan.expanded | {i}, below):
                plan.expanded.add(i)
        if text_only:  # whatever did not fit as text is dropped, never read as latents
            plan.dropped = everything - plan.expanded
            if not plan.expanded:
                raise InputError(f"token_budget={token_budget} cannot hold even one passage as text")
        for worst in reversed(ranking):  # drop from the bottom until everything fits
            if fits(plan.expanded, plan.dropped):
                break
            plan.dropped.add(worst)
        if len(plan.dropped) == len(passages):
            if fitted_to_context:
                raise InputError(f"the prompt cannot hold even one passage as latents within the decoder's {context:,} "
                                 f"positions ({reserve:,} kept for the answer, {overhead:,} for the question and template)")
            raise InputError(f"token_budget={token_budget} cannot hold even one passage as latents")
        for i in ranking if not expand else ():  # expand=0: as many as fit, the best first, dropping none
            if i not in plan.dropped and i not in plan.expanded and fits(plan.expanded | {i}, plan.dropped):
                plan.expanded.add(i)
    plan.order = [i for i in plan.order if i not in plan.dropped]
    return plan


def sidecar_notes(model: LatentContextModel, passages: Sequence[Passage], order: Sequence[int],
                  expanded: set[int]) -> list[str] | None:
    """The text after each passage of the prompt: a latent passage's key terms where the model reads a
    sidecar (``sidecar_terms``), nothing after an expanded one; None where the model reads none."""
    count = model.config.sidecar_terms
    if not count:
        return None
    return ["" if i in expanded else passage_sidecar(passages[i].text, passages[i].payload, count) for i in order]


def build_segments(model: LatentContextModel, question: str, passages: Sequence[Passage], plan: Plan):
    """The prompt of a plan (its positions recorded on the plan)."""
    slots = [passages[i].text if i in plan.expanded else passages[i].latents for i in plan.order]
    segments = model.decoder.qa_segments(question, slots, sidecar_notes(model, passages, plan.order, plan.expanded))
    plan.prompt_positions = model.prompt_positions(segments)
    return segments


@dataclass
class AutoDecision:
    """What ``decide_expansion`` chose: the plan to answer from and why."""

    plan: Plan
    segments: list
    confidence: float  # of the all-latent answer
    latent_answer: str  # the all-latent answer (the answer itself when nothing was expanded)
    reason: str  # "" (answered from latents) or why passages were expanded
    latent_first_token: float = 0.0  # perf_counter time of the all-latent answer's first token

    @property
    def expanded(self) -> bool:
        return bool(self.reason)


def decide_expansion(model: LatentContextModel, question: str, passages: Sequence[Passage], *, threshold: float | None,
                     answer: Callable[[list], tuple[str, float]], expand: int = 1, policy: str = "attention",
                     token_budget: int | None = None, latency_budget_s: float | None = None, reserve: int = 0) -> AutoDecision:
    """Expand only when the decoder is unsure (``expand="auto"``): answer from latents first.

    The all-latent answer's confidence (exp of its mean token log-probability) is compared with
    ``threshold``: below it, the ``expand`` best passages under ``policy`` go in as text (the
    caller answers again from the returned segments). ``threshold`` None or 0 never expands; 1.0
    always does. The decision is made before any token of the final answer is produced, so a
    streamed answer never restarts. ``answer`` (segments -> text and its first token's time) is
    the caller's generation.
    """
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InputError(f"the auto-expand threshold must be in [0, 1], got {threshold}")
    latent_plan = plan_prompt(model, question, passages, expand=0, token_budget=token_budget, latency_budget_s=latency_budget_s,
                              reserve=reserve)
    latent_plan.expanded = {i for i in latent_plan.expanded if passages[i].latents is None}  # the first read is of latents only
    segments = build_segments(model, question, passages, latent_plan)
    text, first = answer(segments)
    confidence = model.decoder.answer_confidence(segments, text)
    if not threshold or (confidence >= threshold and threshold < 1.0):
        return AutoDecision(latent_plan, segments, confidence, text, "", first)
    plan = plan_prompt(model, question, passages, expand=expand, policy=policy, token_budget=token_budget,
                       latency_budget_s=latency_budget_s, reserve=reserve)
    segments = build_segments(model, question, passages, plan)
    return AutoDecision(plan, segments, confidence, text, f"confidence {confidence:.3f} < threshold {threshold:g}", first)
