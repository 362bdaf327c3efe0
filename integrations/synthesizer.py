"""``LatentSynthesizer``: a LlamaIndex response synthesizer that decodes from the nodes' latents.

It is what makes the standard query engine read latents::

    RetrieverQueryEngine(retriever=index.as_retriever(), response_synthesizer=LatentSynthesizer(model),
                         node_postprocessors=[LatentContextPostprocessor(model, store=store)])

An adapter over `lclm_rag.rag.LatentRAG`: each node becomes a passage with the latents it
carries (or, with ``store``, fetched by node id; or its text compressed, flagged ``computed``),
and the answer comes back as ``Response`` / ``StreamingResponse`` with ``source_nodes`` and the
plan in ``metadata``, sync, async or streamed (the plan made before the first token).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from lclm_rag.integrations.nodes import LatentNode, to_passage
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.llms.mock import MockLLM
from llama_index.core.response_synthesizers.base import BaseSynthesizer
from llama_index.core.schema import NodeWithScore, QueryBundle

from lclm_rag.errors import InputError
from lclm_rag.model import LatentContextModel
from lclm_rag.planning import Passage
from lclm_rag.query_config import QueryConfig
from lclm_rag.rag import LatentRAG
from lclm_rag.store import LatentStore


class LatentSynthesizer(BaseSynthesizer):
    """Answer from the retrieved nodes as latents, ``expand`` of them as raw text.

    The settings are `QueryConfig`'s (``expand_policy`` is its ``policy``): ``expand="auto"``
    answers from latents and only if that answer's confidence is below ``auto_threshold`` expands
    the ``auto_expand`` best passages and answers again (``metadata["auto"]`` says what was decided
    and why); ``token_budget`` and ``latency_budget_s`` bound the prompt, dropping the lowest-ranked
    latents (``mode: "dropped"`` in the metadata). ``generate_kwargs``: generation settings.
    """

    def __init__(self, model: LatentContextModel, *, store: LatentStore | None = None, expand: int | str = 0,
                 expand_policy: str | None = None, token_budget: int | None = None, latency_budget_s: float | None = None,
                 max_new_tokens: int = QueryConfig.max_new_tokens, auto_threshold: float | None = QueryConfig.auto_threshold,
                 auto_expand: int = QueryConfig.auto_expand, compress_missing: bool = True, streaming: bool = False,
                 callback_manager=None, **generate_kwargs: Any) -> None:
        config = QueryConfig(expand=expand, policy=expand_policy, token_budget=token_budget, latency_budget_s=latency_budget_s,
                             max_new_tokens=max_new_tokens, auto_threshold=auto_threshold, auto_expand=auto_expand,
                             compress_missing=compress_missing)
        # LlamaIndex's base class sizes prompts with an LLM; this synthesizer never calls one, and
        # MockLLM keeps the base class from resolving (and downloading) a default LLM
        super().__init__(llm=MockLLM(), callback_manager=callback_manager, streaming=streaming)
        self.rag = LatentRAG(model, store, config=config, **generate_kwargs)

    @property
    def model(self) -> LatentContextModel:
        return self.rag.model

    @property
    def config(self) -> QueryConfig:
        return self.rag.config

    def _get_prompts(self) -> dict:
        return {}  # no text prompt template: the prompt is the decoder's, with latent slots

    def _update_prompts(self, prompts) -> None:
        pass

    def synthesize(self, query, nodes: list[NodeWithScore], additional_source_nodes: Sequence[NodeWithScore] | None = None,
                   **response_kwargs: Any):
        query = QueryBundle(query_str=query) if isinstance(query, str) else query
        if not nodes:
            raise InputError("no nodes to answer from: the latent synthesizer never answers without context")
        with self._callback_manager.event(CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: query.query_str}) as event:
            passages = [to_passage(n) for n in nodes]
            answer = (self.rag.stream if self._streaming else self.rag.answer)(query.query_str, passages)
            for n in nodes:
                if isinstance(n.node, LatentNode):
                    n.node._read = True  # the latents it carries were read (a postprocessor checks)
            sources = [nodes[i] for i in answer.kept] + list(additional_source_nodes or [])
            if self._streaming:
                response = StreamingResponse(response_gen=answer.pieces, source_nodes=sources, metadata=answer.metadata())
            else:
                response = Response(answer.text, source_nodes=sources, metadata=answer.metadata())
            event.on_end(payload={EventPayload.RESPONSE: response})
        return response

    async def asynthesize(self, query, nodes: list[NodeWithScore], additional_source_nodes: Sequence[NodeWithScore] | None = None,
                          **response_kwargs: Any):
        return await asyncio.to_thread(self.synthesize, query, nodes, additional_source_nodes, **response_kwargs)

    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> str:
        """Text chunks without nodes (no latents to read): the decoder reads them as text."""
        if not text_chunks:
            raise InputError("no text to answer from")
        passages = [Passage(f"chunk-{i}", text, None, None, "none") for i, text in enumerate(text_chunks)]
        return self.rag.with_config(compress_missing=False, expand=len(passages)).answer(query_str, passages).text

    async def aget_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> str:
        return await asyncio.to_thread(self.get_response, query_str, text_chunks, **response_kwargs)
