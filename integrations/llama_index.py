"""LlamaIndex components: a retriever, a node postprocessor, a response synthesizer, a query engine.

- ``LatentRetriever``: one store query returns the top-k nodes with scores, payload and latents.
- ``LatentContextPostprocessor``: for nodes from any retriever, attaches stored latents by node
  id (compressing on the fly, and flagging, the ones the collection does not hold); returns the
  same nodes, in order, scores and metadata untouched.
- ``LatentSynthesizer`` (``integrations/synthesizer.py``): decodes from the nodes' latents, so
  LlamaIndex's own ``RetrieverQueryEngine`` answers from latents.
- ``LatentCompression`` and ``LatentVectorStore`` (``integrations/vector_store.py``): an
  ``IngestionPipeline`` or ``VectorStoreIndex`` writes latent collections.
- ``LatentQueryEngine``: a ``RetrieverQueryEngine`` with a ``LatentSynthesizer``, built in one line
  from a collection; the decoder skims every passage as latents and reads ``expand`` as text.

Latents travel in a ``LatentCache`` keyed by node id (``integrations/cache.py``), never in node
metadata.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any

from lclm_rag.integrations.cache import SHARED_CACHE, LatentCache, fill
from lclm_rag.integrations.synthesizer import LatentSynthesizer
from lclm_rag.integrations.vector_store import LatentCompression, LatentVectorStore
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from pydantic import Field, PrivateAttr

from lclm_rag.embedding import Embedder
from lclm_rag.errors import InputError, StoreError
from lclm_rag.model import LatentContextModel, load_model
from lclm_rag.store import LatentStore

logger = logging.getLogger(__name__)
__all__ = ["LatentCache", "LatentCompression", "LatentContextPostprocessor", "LatentQueryEngine", "LatentRetriever",
           "LatentSynthesizer", "LatentVectorStore"]


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
        self.cache = cache or SHARED_CACHE
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
    """Attach stored latents to nodes from any retriever, by node id; compress the rest on the fly.

    The latents are for a ``LatentSynthesizer`` (or ``LatentQueryEngine``) reading the same cache;
    used with a synthesizer that reads only text, it warns once, at its first use.
    """

    compress_missing: bool = Field(default=True, description="compress nodes the collection does not hold (flagged 'computed')")
    _store: LatentStore | None = PrivateAttr(default=None)
    _model: LatentContextModel = PrivateAttr()
    _cache: LatentCache = PrivateAttr()
    _warned: bool = PrivateAttr(default=False)

    def __init__(self, model: LatentContextModel, store: LatentStore | None = None, cache: LatentCache | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if store is not None:
            store.require(model.fingerprint())
        self._store, self._model, self._cache = store, model, cache or SHARED_CACHE

    @classmethod
    def class_name(cls) -> str:
        return "LatentContextPostprocessor"

    @property
    def cache(self) -> LatentCache:
        return self._cache

    def use_cache(self, cache: LatentCache) -> None:
        self._cache = cache

    def _postprocess_nodes(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        if not self._cache.has_reader and not self._warned:
            self._warned = True
            warnings.warn("LatentContextPostprocessor: no LatentSynthesizer reads these latents, so the answer will come "
                          "from the text: pass response_synthesizer=LatentSynthesizer(model) to the query engine "
                          "(or use LatentQueryEngine)", UserWarning, stacklevel=3)
        fill(self._cache, [n.node for n in nodes], self._model, self._store, self.compress_missing)
        return nodes


class LatentQueryEngine(RetrieverQueryEngine):
    """``RetrieverQueryEngine`` with a ``LatentSynthesizer``: retrieve, postprocess, decode from latents.

    Nodes from a foreign retriever get their latents through a ``LatentContextPostprocessor``
    (added if none is given). Response metadata adds the retrieval time to the synthesizer's plan.
    """

    def __init__(self, retriever: BaseRetriever, model: LatentContextModel, node_postprocessors: Sequence[BaseNodePostprocessor] = (),
                 streaming: bool = False, expand: int | str = 0, expand_policy: str = "score", token_budget: int | None = None,
                 max_new_tokens: int = 64, callback_manager: CallbackManager | None = None, **generate_kwargs: Any) -> None:
        cache = getattr(retriever, "cache", None) or LatentCache()
        postprocessors = list(node_postprocessors)
        for post in postprocessors:
            if isinstance(post, LatentContextPostprocessor):
                post.use_cache(cache)
        if isinstance(retriever, LatentRetriever):
            retriever.store.require(model.fingerprint())
        elif not any(isinstance(p, LatentContextPostprocessor) for p in postprocessors):
            postprocessors.append(LatentContextPostprocessor(model, cache=cache))  # compresses on the fly
        synthesizer = LatentSynthesizer(model, cache=cache, expand=expand, expand_policy=expand_policy, token_budget=token_budget,
                                        max_new_tokens=max_new_tokens, streaming=streaming, callback_manager=callback_manager,
                                        **generate_kwargs)
        super().__init__(retriever, response_synthesizer=synthesizer, node_postprocessors=postprocessors,
                         callback_manager=callback_manager)

    @property
    def synthesizer(self) -> LatentSynthesizer:
        return self._response_synthesizer

    @property
    def streaming(self) -> bool:
        return self._response_synthesizer._streaming

    @streaming.setter
    def streaming(self, value: bool) -> None:
        self._response_synthesizer._streaming = value

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
                        backend: str = "auto", model: LatentContextModel | str | None = None, similarity_top_k: int = 5,
                        **kwargs: Any) -> "LatentQueryEngine":
        """One line from an existing collection (embedded by name or path, qdrant-client local mode
        with ``backend="qdrant"``, or a Qdrant URL) to answers."""
        store = LatentStore.open(collection, path=path, url=url, api_key=api_key, backend=backend)
        if not isinstance(model, LatentContextModel):
            store.require()  # a missing collection fails before the model loads
            model = load_model(model)
        store.require(model.fingerprint())
        retriever = LatentRetriever(store, similarity_top_k=similarity_top_k, cache=LatentCache())
        return cls.from_args(retriever, model=model, **kwargs)

    def _query(self, query_bundle: QueryBundle):
        if not query_bundle.query_str.strip():
            raise InputError("the question is empty")
        start = time.perf_counter()
        nodes = self.retrieve(query_bundle)
        retrieved = time.perf_counter()
        if not nodes:
            raise StoreError("retrieval returned no passages: refusing to answer without context")
        response = self._response_synthesizer.synthesize(query=query_bundle, nodes=nodes)
        response.metadata["timings"].update(retrieve_s=retrieved - start, total_s=time.perf_counter() - start)
        return response

    async def _aquery(self, query_bundle: QueryBundle):
        import asyncio

        return await asyncio.to_thread(self._query, query_bundle)
