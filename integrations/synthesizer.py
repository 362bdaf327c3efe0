"""``LatentSynthesizer``: a LlamaIndex response synthesizer that decodes from the nodes' latents.

It is what makes the standard query engine read latents::

    RetrieverQueryEngine(retriever=index.as_retriever(), response_synthesizer=LatentSynthesizer(model),
                         node_postprocessors=[LatentContextPostprocessor(model, store=store)])

For each node it takes the latents a ``LatentRetriever`` or ``LatentContextPostprocessor`` left
in the cache (or, with ``store``, fetches them by node id; or compresses the node's text, flagged
``computed``), plans which passages to expand to raw text, and decodes with the latent decoder:
sync, async and streaming, as ``Response`` / ``StreamingResponse`` with ``source_nodes`` and the
plan in ``metadata``. With a streaming response the plan is made before the first token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from lclm_rag.integrations.cache import SHARED_CACHE, LatentCache, fill, node_text
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.llms.mock import MockLLM
from llama_index.core.response_synthesizers.base import BaseSynthesizer
from llama_index.core.schema import NodeWithScore, QueryBundle

from lclm_rag import planning
from lclm_rag.errors import InputError
from lclm_rag.model import LatentContextModel
from lclm_rag.prompt import latent_positions
from lclm_rag.skim import skim_probe
from lclm_rag.store import LatentStore


class LatentSynthesizer(BaseSynthesizer):
    """Answer from the retrieved nodes as latents, ``expand`` of them as raw text.

    ``expand="auto"``: answer from latents, and only if that answer's confidence is below
    ``auto_threshold`` expand the ``auto_expand`` best passages (under ``expand_policy``) and
    answer again; ``metadata["auto"]`` says what was decided and why. ``token_budget`` (decoder
    positions) and ``latency_budget_s`` (time to first token, at the engine's measured prefill
    cost) bound the prompt: the ``expand`` best passages go in as text ahead of lower-ranked
    latents, which are dropped to make room (``mode: "dropped"`` in the metadata); with
    ``expand=0``, as many passages are expanded as fit.
    """

    def __init__(self, model: LatentContextModel, *, cache: LatentCache | None = None, store: LatentStore | None = None,
                 expand: int | str = 0, expand_policy: str = "score", token_budget: int | None = None,
                 latency_budget_s: float | None = None, max_new_tokens: int = 64, auto_threshold: float | None = 0.5, auto_expand: int = 1,
                 compress_missing: bool = True, streaming: bool = False, callback_manager=None, **generate_kwargs: Any) -> None:
        if expand_policy not in planning.POLICIES:
            raise InputError(f"expand_policy must be one of {planning.POLICIES}, got {expand_policy!r}")
        if expand != "auto" and (isinstance(expand, bool) or not isinstance(expand, int) or expand < 0):
            raise InputError(f"expand must be a number of passages (>= 0) or 'auto', got {expand!r}")
        self.auto_threshold, self.auto_expand = auto_threshold, auto_expand
        # the base class wants an LLM for prompt sizing; this synthesizer never calls one
        super().__init__(llm=MockLLM(), callback_manager=callback_manager, streaming=streaming)
        if store is not None:
            store.require(model.fingerprint())
        if expand_policy == "skim":
            skim_probe(model)  # the checkpoint's fitted probe, or a clear error now rather than at the first query
        self._model, self._store = model, store
        self.use_cache(cache or SHARED_CACHE)
        self.expand, self.expand_policy, self.token_budget = expand, expand_policy, token_budget
        if latency_budget_s is not None and latency_budget_s <= 0:
            raise InputError(f"latency_budget_s must be > 0, got {latency_budget_s}")
        self.latency_budget_s = latency_budget_s
        self.max_new_tokens, self.compress_missing, self.generate_kwargs = max_new_tokens, compress_missing, generate_kwargs

    @property
    def model(self) -> LatentContextModel:
        return self._model

    @property
    def cache(self) -> LatentCache:
        return self._cache

    def use_cache(self, cache: LatentCache) -> None:
        self._cache = cache
        cache.has_reader = True

    def _get_prompts(self) -> dict:
        return {}

    def _update_prompts(self, prompts) -> None:
        pass

    # ------------------------------------------------------------------ latents for the nodes
    def passages(self, nodes: Sequence[NodeWithScore]) -> list[planning.Passage]:
        """Each node as the decoder will see it: cached, stored or (flagged) computed latents."""
        fill(self._cache, [n.node for n in nodes], self._model, self._store, self.compress_missing)
        out = []
        for n in nodes:
            latents, source = self._cache.get(n.node.node_id) or (None, "none")
            out.append(planning.Passage(n.node.node_id, node_text(n.node), n.score, latents, source,
                                        doc_id=(n.node.metadata or {}).get("doc_id")))
        return out

    def plan(self, question: str, nodes: Sequence[NodeWithScore]):
        """(kept nodes, prompt segments, metadata): what goes in as latents, as text, or not at all."""
        return self._plan(question, nodes)[:3]

    def _plan(self, question: str, nodes: Sequence[NodeWithScore]):
        if not question.strip():
            raise InputError("the question is empty")
        start = time.perf_counter()
        passages = self.passages(nodes)
        decision = None
        if self.expand == "auto":
            decision = planning.decide_expansion(self._model, question, passages, threshold=self.auto_threshold,
                                                 expand=self.auto_expand, policy=self.expand_policy, token_budget=self.token_budget,
                                                 latency_budget_s=self.latency_budget_s, max_new_tokens=self.max_new_tokens, **self.generate_kwargs)
            plan, segments = decision.plan, decision.segments
        else:
            plan = planning.plan_prompt(self._model, question, passages, self.expand, self.expand_policy, self.token_budget,
                                        self.latency_budget_s)
            segments = planning.build_segments(self._model, question, passages, plan)
        metadata = {
            "passages": [
                {"node_id": p.id, "score": p.score, "mode": "dropped" if i in plan.dropped else "text" if i in plan.expanded else "latent",
                 "latent_source": p.latent_source, "latent_positions": None if p.latents is None else latent_positions(p.latents.shape[0])}
                for i, p in enumerate(passages)
            ],
            "expanded": [passages[i].id for i in plan.order if i in plan.expanded],
            "prompt_positions": plan.prompt_positions,
            "compressor_fingerprint": self._model.fingerprint(),
            "timings": {"prepare_s": time.perf_counter() - start},
        }
        if decision is not None:
            metadata["auto"] = {"expanded": decision.expanded, "reason": decision.reason or "confident from latents",
                                "confidence": decision.confidence, "threshold": self.auto_threshold, "policy": self.expand_policy}
        return [nodes[i] for i in plan.order], segments, metadata, decision

    # ------------------------------------------------------------------ LlamaIndex entry points
    def synthesize(self, query, nodes: list[NodeWithScore], additional_source_nodes: Sequence[NodeWithScore] | None = None,
                   **response_kwargs: Any):
        query = QueryBundle(query_str=query) if isinstance(query, str) else query
        if not nodes:
            raise InputError("no nodes to answer from: the latent synthesizer never answers without context")
        with self._callback_manager.event(CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: query.query_str}) as event:
            kept, segments, metadata, decided = self._plan(query.query_str, nodes)
            sources = list(kept) + list(additional_source_nodes or [])
            if decided is not None and not decided.expanded:  # the all-latent answer already is the answer
                text = decided.latent_answer
                response = (StreamingResponse(response_gen=iter([text]), source_nodes=sources, metadata=metadata) if self._streaming
                            else Response(text, source_nodes=sources, metadata=metadata))
            elif self._streaming:
                gen = planning.stream(self._model, segments, self.max_new_tokens, **self.generate_kwargs)
                response = StreamingResponse(response_gen=gen, source_nodes=sources, metadata=metadata)
            else:
                start = time.perf_counter()
                text = planning.generate(self._model, segments, self.max_new_tokens, **self.generate_kwargs)
                metadata["timings"]["generate_s"] = time.perf_counter() - start
                response = Response(text, source_nodes=sources, metadata=metadata)
            event.on_end(payload={EventPayload.RESPONSE: response})
        return response

    async def asynthesize(self, query, nodes: list[NodeWithScore], additional_source_nodes: Sequence[NodeWithScore] | None = None,
                          **response_kwargs: Any):
        return await asyncio.to_thread(self.synthesize, query, nodes, additional_source_nodes, **response_kwargs)

    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> str:
        """Text chunks without nodes (no latents to read): the decoder reads them as text."""
        if not text_chunks:
            raise InputError("no text to answer from")
        return self._model.answer(query_str, list(text_chunks), max_new_tokens=self.max_new_tokens, **self.generate_kwargs)

    async def aget_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> str:
        return await asyncio.to_thread(self.get_response, query_str, text_chunks, **response_kwargs)
