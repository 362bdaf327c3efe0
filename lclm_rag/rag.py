"""The one query path: retrieve, bring each passage's latents, plan, generate (or stream), as one answer.

``LatentRAG(model, store, embedder, config)`` is what `lclm-rag query`, `lclm-rag eval`, the skim
probe's fitting and the LlamaIndex classes all run; they differ only in where passages come from
(this store's search, or nodes from any LlamaIndex retriever) and in what they do with the
``Answer``. It needs no LlamaIndex. Every setting is a `QueryConfig` field, defaulted and checked
there; nothing on the path is process-wide (the prefill cost is kept on the decode engine, the
skim probe on the model).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lclm_rag.embedding import Embedder
from lclm_rag.engine import GenerationSettings
from lclm_rag.errors import InputError, StoreError
from lclm_rag.model import LatentContextModel
from lclm_rag.planning import AutoDecision, Passage, Plan, build_segments, decide_expansion, plan_prompt
from lclm_rag.prompt import latent_positions
from lclm_rag.query_config import QueryConfig
from lclm_rag.store import LatentStore, id_for_node

logger = logging.getLogger(__name__)
__all__ = ["Answer", "LatentRAG", "Passage", "QueryConfig"]


@dataclass
class Answer:
    """One question's answer and how it was made: which passages went in as latents, as text or not
    at all, the prompt's positions, the timings and, with ``expand="auto"``, the decision.

    A streamed answer has ``pieces`` (consume them once) and ``text`` None."""

    question: str
    text: str | None
    passages: list[Passage]  # in retrieval order
    plan: Plan
    policy: str
    compressor_fingerprint: str
    timings: dict[str, float] = field(default_factory=dict)
    auto: dict[str, Any] | None = None
    pieces: Iterator[str] | None = None
    boundaries: int = 2  # boundary embeddings around each passage's latents (the model's config says)

    def mode(self, index: int) -> str:
        """``latent``, ``text`` or ``dropped``: how passage ``index`` went into the prompt."""
        return "dropped" if index in self.plan.dropped else "text" if index in self.plan.expanded else "latent"

    @property
    def kept(self) -> list[int]:
        """Passage indices in prompt order (the dropped left out)."""
        return list(self.plan.order)

    @property
    def prompt_positions(self) -> int:
        return self.plan.prompt_positions

    def metadata(self) -> dict[str, Any]:
        """The plan as plain data (a LlamaIndex response's ``metadata``)."""
        meta = {
            "passages": [{"node_id": p.id, "score": p.score, "mode": self.mode(i), "latent_source": p.latent_source,
                          "latent_positions": None if p.latents is None else latent_positions(p.latents.shape[0], self.boundaries)}
                         for i, p in enumerate(self.passages)],
            "expanded": [self.passages[i].id for i in self.plan.order if i in self.plan.expanded],
            "prompt_positions": self.plan.prompt_positions,
            "compressor_fingerprint": self.compressor_fingerprint,
            "timings": self.timings,
        }
        if self.auto is not None:
            meta["auto"] = self.auto
        return meta


class LatentRAG:
    """Answer questions from a latent collection (or from passages given), framework-free.

    ``store`` (a `LatentStore`) is searched with ``embedder`` (default: the collection's own
    embedding model); without a store, passages are given to `answer`. ``generation``:
    `GenerationSettings` fields besides ``max_new_tokens`` (sampling, repetition penalty).
    """

    def __init__(self, model: LatentContextModel, store: LatentStore | None = None, embedder: Embedder | None = None,
                 config: QueryConfig | None = None, **generation: Any) -> None:
        self.model, self.store = model, store
        self.config = config or QueryConfig()
        self.generation = generation
        GenerationSettings(max_new_tokens=self.config.max_new_tokens, **generation)  # checked now, not at the first answer
        if self.config.expand_policy == "skim":
            model.require_skim_probe()  # a clear error now rather than at the first query
        self._embedder, self._size = embedder, None
        if store is not None:
            spec = store.require(model.fingerprint())
            if embedder is not None and embedder.dim != spec.embedding_dim:
                raise StoreError(f"embedder {embedder.name!r} is {embedder.dim}-d; the collection was built with "
                                 f"{spec.embedding_model!r} ({spec.embedding_dim}-d)")
            self._size = store.count()
            if self.config.top_k > self._size:  # a small collection: every passage is retrieved
                logger.info("top_k=%d but collection %r holds %d passages: retrieving all", self.config.top_k, store.name, self._size)

    @property
    def embedder(self) -> Embedder:
        """The question embedder: the one given, else the collection's own model (loaded at the first search)."""
        if self._embedder is None:
            if self.store is None:
                raise InputError("this LatentRAG has no store to retrieve from: give it passages")
            self._embedder = Embedder(self.store.require().embedding_model)
        return self._embedder

    @property
    def top_k(self) -> int:
        """Passages retrieved: ``config.top_k``, or all the collection holds when that is fewer."""
        return self.config.top_k if self._size is None else max(min(self.config.top_k, self._size), 1)

    def with_config(self, **changes: Any) -> "LatentRAG":
        """The same model, store and embedder under other settings (e.g. each mode of an evaluation)."""
        other = object.__new__(LatentRAG)
        other.__dict__.update(self.__dict__)
        other.config = self.config.replace(**changes)
        if other.config.expand_policy == "skim":
            self.model.require_skim_probe()
        return other

    # ------------------------------------------------------------------ passages
    def retrieve(self, question: str) -> list[Passage]:
        """The store's top-k passages for ``question``, with their stored latents (one round trip, no encoder)."""
        if self.store is None:
            raise InputError("this LatentRAG has no store to retrieve from: give it passages")
        return retrieve_passages(self.store, self.embedder, question, self.top_k)

    def complete(self, passages: Sequence[Passage]) -> list[Passage]:
        """The passages, each with latents: carried ones kept, the rest fetched from the store by node id
        (one round trip) or, with ``compress_missing``, compressed now and flagged ``computed``."""
        missing = [p for p in passages if p.latents is None]
        if missing and self.store is not None:
            by_point = {id_for_node(p.id): p for p in missing}
            for hit in self.store.retrieve(list(by_point), with_latents=True):
                by_point[hit.id].latents, by_point[hit.id].latent_source = hit.latents, "stored"
            missing = [p for p in missing if p.latents is None]
        if missing and self.config.compress_missing:
            for p, latents in zip(missing, self.model.compress([p.text for p in missing]), strict=True):
                p.latents, p.latent_source = latents, "computed"
        return list(passages)

    # ------------------------------------------------------------------ answers
    def answer(self, question: str, passages: Sequence[Passage] | None = None) -> Answer:
        """Retrieve (unless ``passages`` are given), plan and generate greedily (or as ``generation`` says)."""
        prepared = self._prepare(question, passages)
        if prepared.text is None:
            start = time.perf_counter()
            prepared.text, first = self.generate(prepared.segments)
            prepared.timings.update(generate_s=time.perf_counter() - start, first_token_s=first - prepared.started)
        prepared.timings["total_s"] = time.perf_counter() - prepared.started
        return prepared.answer

    def stream(self, question: str, passages: Sequence[Passage] | None = None) -> Answer:
        """As `answer`, with the text as ``pieces``; every plan and auto decision is made before the first piece."""
        prepared = self._prepare(question, passages)
        if prepared.text is not None:  # the all-latent answer already is the answer
            prepared.answer.pieces, prepared.answer.text = iter([prepared.text]), None
        else:
            settings = GenerationSettings(max_new_tokens=self.config.max_new_tokens, **self.generation)
            with torch.no_grad():
                prompt = self.model.decoder.embed(prepared.segments)
            prepared.answer.pieces = self.model.decoder.engine.stream(prompt, settings)
        return prepared.answer

    async def aanswer(self, question: str, passages: Sequence[Passage] | None = None) -> Answer:
        return await asyncio.to_thread(self.answer, question, passages)

    def generate(self, segments: Sequence) -> tuple[str, float]:
        """The answer to a built prompt and the ``perf_counter`` time of its first token, on the model's engine."""
        with torch.no_grad():
            prompt = self.model.decoder.embed(segments)
        return self.model.decoder.engine.timed(prompt, GenerationSettings(max_new_tokens=self.config.max_new_tokens,
                                                                          **self.generation))

    def plan(self, question: str, passages: Sequence[Passage]) -> tuple[Plan, list, AutoDecision | None]:
        """The plan, its prompt segments and (``expand="auto"``) the decision, for passages in hand."""
        c, model = self.config, self.model
        if c.auto:
            decision = decide_expansion(model, question, passages, threshold=c.auto_threshold, answer=self.generate,
                                        expand=c.auto_expand, policy=c.expand_policy, token_budget=c.token_budget,
                                        latency_budget_s=c.latency_budget_s, reserve=c.max_new_tokens)
            return decision.plan, decision.segments, decision
        plan = plan_prompt(model, question, passages, 0 if c.text_only else c.expand, c.expand_policy, c.token_budget,
                           c.latency_budget_s, reserve=c.max_new_tokens, text_only=c.text_only)
        return plan, build_segments(model, question, passages, plan), None

    def _prepare(self, question: str, passages: Sequence[Passage] | None) -> "_Prepared":
        check_question(question)
        started = time.perf_counter()
        timings: dict[str, float] = {}
        if passages is None:
            passages = self.retrieve(question)
            timings["retrieve_s"] = time.perf_counter() - started
            if not passages:
                raise StoreError("retrieval returned no passages: refusing to answer without context")
        elif not passages:
            raise InputError("no passages to answer from: the latent decoder never answers without context")
        prepare = time.perf_counter()
        passages = self.complete(passages)
        plan, segments, decision = self.plan(question, passages)
        timings["prepare_s"] = time.perf_counter() - prepare
        auto, text = None, None
        if decision is not None:
            auto = {"expanded": decision.expanded, "reason": decision.reason or "confident from latents",
                    "confidence": decision.confidence, "threshold": self.config.auto_threshold, "policy": self.config.expand_policy}
            if not decision.expanded:
                text = decision.latent_answer
                timings["first_token_s"] = decision.latent_first_token - started
        answer = Answer(question, text, list(passages), plan, self.config.expand_policy, self.model.fingerprint(), timings, auto,
                        boundaries=self.model.config.boundary_positions)
        return _Prepared(answer, segments, started, timings)


@dataclass
class _Prepared:
    answer: Answer
    segments: list
    started: float
    timings: dict[str, float]

    @property
    def text(self) -> str | None:
        return self.answer.text

    @text.setter
    def text(self, value: str) -> None:
        self.answer.text = value


def retrieve_passages(store: LatentStore, embedder: Embedder, question: str, top_k: int) -> list[Passage]:
    """Dense search: the top-k passages with their payload and stored latents (the encoder does not run)."""
    check_question(question)
    vector = embedder.embed([question])[0]
    return [Passage(h.id, h.text, h.score, h.latents, "stored", doc_id=h.payload.get("doc_id"), payload=h.payload)
            for h in store.search(vector, top_k, with_latents=True)]


def check_question(question: object) -> str:
    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty")
    return question
