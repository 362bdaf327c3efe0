"""LlamaIndex components: a retriever, a node postprocessor and a drop-in query engine.

- ``LatentRetriever``: one store query returns the top-k nodes with scores, payload and latents.
- ``LatentContextPostprocessor``: for nodes from any retriever, attaches stored latents by node
  id (compressing on the fly, and flagging, the ones the collection does not hold); returns the
  same nodes, in order, scores and metadata untouched.
- ``LatentQueryEngine``: drop-in for ``RetrieverQueryEngine``; the decoder skims every passage as
  latents and reads the ``expand`` most relevant as raw text.

Latents never ride inside node metadata (they would leak into prompts and docstores): they sit in
a ``LatentCache`` keyed by node id, shared by the components of one engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.callbacks import CallbackManager
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from pydantic import Field, PrivateAttr

from lclm_rag import planning as q
from lclm_rag.embedding import Embedder
from lclm_rag.errors import InputError, StoreError
from lclm_rag.model import LatentContextModel, load_model
from lclm_rag.prompt import latent_positions
from lclm_rag.store import LatentStore, id_for_node

logger = logging.getLogger(__name__)


class LatentCache:
    """Bounded map node id -> (latents, source) shared by one engine's retriever and postprocessors."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[torch.Tensor, str]] = OrderedDict()

    def put(self, node_id: str, latents: torch.Tensor, source: str) -> None:
        self._items[node_id] = (latents, source)
        self._items.move_to_end(node_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, node_id: str) -> tuple[torch.Tensor, str] | None:
        return self._items.get(node_id)


def _node_text(node) -> str:
    return node.get_content() if hasattr(node, "get_content") else str(node)


class LatentRetriever(BaseRetriever):
    """Dense search in a latent collection; the hits' latents come back in the same round trip."""

    def __init__(self, store: LatentStore, embedder: Embedder | None = None, similarity_top_k: int = 5,
                 cache: LatentCache | None = None, callback_manager: CallbackManager | None = None) -> None:
        spec = store.require()
        if not isinstance(similarity_top_k, int) or similarity_top_k <= 0:
            raise InputError(f"similarity_top_k must be a positive integer, got {similarity_top_k!r}")
        size = store.count()
        if similarity_top_k > size:  # a small collection: every passage is retrieved
            logger.info("similarity_top_k=%d but collection %r holds %d passages: retrieving all", similarity_top_k, store.name, size)
            similarity_top_k = max(size, 1)
        self.store = store
        self.embedder = embedder or Embedder(spec.embedding_model)
        if self.embedder.dim != spec.embedding_dim:
            raise StoreError(f"embedder {self.embedder.name!r} is {self.embedder.dim}-d; the collection was built with {spec.embedding_model!r} ({spec.embedding_dim}-d)")
        self.similarity_top_k = similarity_top_k
        self.cache = cache or LatentCache()
        super().__init__(callback_manager=callback_manager)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        if not query_bundle.query_str.strip():
            raise InputError("the question is empty")
        vector = self.embedder.embed([query_bundle.query_str])[0]
        out = []
        for hit in self.store.search(vector, self.similarity_top_k, with_latents=True):
            meta = {k: v for k, v in hit.payload.items() if k != "text"}
            node = TextNode(id_=hit.id, text=hit.text, metadata=meta,
                            excluded_llm_metadata_keys=list(meta), excluded_embed_metadata_keys=list(meta))
            self.cache.put(hit.id, hit.latents, "stored")
            out.append(NodeWithScore(node=node, score=hit.score))
        return out


class LatentContextPostprocessor(BaseNodePostprocessor):
    """Attach stored latents to nodes from any retriever, by node id; compress the rest on the fly."""

    compress_missing: bool = Field(default=True, description="compress nodes the collection does not hold (flagged 'computed')")
    _store: LatentStore | None = PrivateAttr(default=None)
    _model: LatentContextModel = PrivateAttr()
    _cache: LatentCache = PrivateAttr()

    def __init__(self, model: LatentContextModel, store: LatentStore | None = None, cache: LatentCache | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if store is not None:
            store.require(model.fingerprint())
        self._store, self._model, self._cache = store, model, cache or LatentCache()

    @classmethod
    def class_name(cls) -> str:
        return "LatentContextPostprocessor"

    @property
    def cache(self) -> LatentCache:
        return self._cache

    def use_cache(self, cache: LatentCache) -> None:
        self._cache = cache

    def _postprocess_nodes(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        missing = [n for n in nodes if self._cache.get(n.node.node_id) is None]
        if missing and self._store is not None:  # one round trip for all of them
            by_point = {id_for_node(n.node.node_id): n.node.node_id for n in missing}
            for hit in self._store.retrieve(list(by_point), with_latents=True):
                self._cache.put(by_point[hit.id], hit.latents, "stored")
            missing = [n for n in missing if self._cache.get(n.node.node_id) is None]
        if missing and self.compress_missing:
            for n, lat in zip(missing, self._model.compress([_node_text(n.node) for n in missing])):
                self._cache.put(n.node.node_id, lat, "computed")
        return nodes


class LatentQueryEngine(BaseQueryEngine):
    """Drop-in for ``RetrieverQueryEngine``: retrieve, postprocess, decode from latents (+ expanded text)."""

    def __init__(self, retriever: BaseRetriever, model: LatentContextModel, node_postprocessors: Sequence[BaseNodePostprocessor] = (),
                 streaming: bool = False, expand: int = 0, expand_policy: str = "score", token_budget: int | None = None,
                 max_new_tokens: int = 64, callback_manager: CallbackManager | None = None, **generate_kwargs: Any) -> None:
        if expand_policy not in q.POLICIES:
            raise InputError(f"expand_policy must be one of {q.POLICIES}, got {expand_policy!r}")
        self._retriever = retriever
        self._model = model
        self._node_postprocessors = list(node_postprocessors)
        self._cache = getattr(retriever, "cache", None) or LatentCache()
        for post in self._node_postprocessors:
            if isinstance(post, LatentContextPostprocessor):
                post.use_cache(self._cache)
        if isinstance(retriever, LatentRetriever):
            retriever.store.require(model.fingerprint())
        elif not any(isinstance(p, LatentContextPostprocessor) for p in self._node_postprocessors):
            # nodes from a foreign retriever: get latents through a postprocessor (compressing on the fly)
            self._node_postprocessors.append(LatentContextPostprocessor(model, cache=self._cache))
        self.streaming, self.expand, self.expand_policy = streaming, expand, expand_policy
        self.token_budget, self.max_new_tokens, self.generate_kwargs = token_budget, max_new_tokens, generate_kwargs
        super().__init__(callback_manager=callback_manager)

    @classmethod
    def from_args(cls, retriever: BaseRetriever, model: LatentContextModel | None = None,
                  node_postprocessors: Sequence[BaseNodePostprocessor] | None = None, streaming: bool = False,
                  callback_manager: CallbackManager | None = None, **kwargs: Any) -> "LatentQueryEngine":
        """Same entry point as ``RetrieverQueryEngine.from_args`` (``llm``/synthesizer args are not used)."""
        for unused in ("llm", "response_synthesizer", "response_mode", "text_qa_template", "use_async"):
            kwargs.pop(unused, None)
        model = model or load_model()
        return cls(retriever, model, node_postprocessors or (), streaming=streaming, callback_manager=callback_manager, **kwargs)

    @classmethod
    def from_collection(cls, collection: str, *, path: str | None = None, url: str | None = None, api_key: str | None = None,
                        model: LatentContextModel | str | None = None, similarity_top_k: int = 5, **kwargs: Any) -> "LatentQueryEngine":
        """One line from an existing collection (embedded by name or path, or a Qdrant URL) to answers."""
        store = LatentStore.open(collection, path=path, url=url, api_key=api_key)
        if not isinstance(model, LatentContextModel):
            model = load_model(model)
        store.require(model.fingerprint())
        retriever = LatentRetriever(store, similarity_top_k=similarity_top_k)
        return cls.from_args(retriever, model=model, **kwargs)

    def _get_prompt_modules(self) -> dict:
        return {}

    # ------------------------------------------------------------------ the query path
    def retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        nodes = self._retriever.retrieve(query_bundle)
        for post in self._node_postprocessors:
            nodes = post.postprocess_nodes(nodes, query_bundle=query_bundle)
        return nodes

    def _prepare(self, query_bundle: QueryBundle):
        if not query_bundle.query_str.strip():
            raise InputError("the question is empty")
        t0 = time.perf_counter()
        nodes = self.retrieve(query_bundle)
        t1 = time.perf_counter()
        if not nodes:
            raise StoreError("retrieval returned no passages: refusing to answer without context")
        passages = []
        for n in nodes:
            entry = self._cache.get(n.node.node_id)
            latents, source = entry if entry is not None else (None, "none")
            passages.append(q.Passage(n.node.node_id, _node_text(n.node), n.score, latents, source))
        plan = q.plan_prompt(self._model, query_bundle.query_str, passages, self.expand, self.expand_policy, self.token_budget)
        segments = q.build_segments(self._model, query_bundle.query_str, passages, plan)
        metadata = {
            "passages": [
                {"node_id": p.id, "score": p.score, "mode": "dropped" if i in plan.dropped else "text" if i in plan.expanded else "latent",
                 "latent_source": p.latent_source, "latent_positions": None if p.latents is None else latent_positions(p.latents.shape[0])}
                for i, p in enumerate(passages)
            ],
            "expanded": [passages[i].id for i in plan.order if i in plan.expanded],
            "prompt_positions": plan.prompt_positions,
            "compressor_fingerprint": self._model.fingerprint(),
            "timings": {"retrieve_s": t1 - t0, "prepare_s": time.perf_counter() - t1},
        }
        kept = [nodes[i] for i in plan.order]
        return kept, segments, metadata

    def _query(self, query_bundle: QueryBundle):
        start = time.perf_counter()
        nodes, segments, metadata = self._prepare(query_bundle)
        if self.streaming:
            gen = q.stream(self._model, segments, self.max_new_tokens, **self.generate_kwargs)
            return StreamingResponse(response_gen=gen, source_nodes=nodes, metadata=metadata)
        t = time.perf_counter()
        text = q.generate(self._model, segments, self.max_new_tokens, **self.generate_kwargs)
        metadata["timings"].update(generate_s=time.perf_counter() - t, total_s=time.perf_counter() - start)
        return Response(response=text, source_nodes=nodes, metadata=metadata)

    async def _aquery(self, query_bundle: QueryBundle):
        return await asyncio.to_thread(self._query, query_bundle)
