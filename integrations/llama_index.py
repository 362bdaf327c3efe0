"""LlamaIndex components, thin adapters (node <-> passage) over `lclm_rag.rag.LatentRAG`.

- ``LatentRetriever``: one store query returns the top-k nodes with scores, payload and latents.
- ``LatentContextPostprocessor``: for nodes from any retriever, attaches stored latents by node
  id (compressing on the fly, and flagging, the ones the collection does not hold); returns the
  same nodes, in order, with the same ids, text, scores and metadata.
- ``LatentSynthesizer`` (``integrations/synthesizer.py``): decodes from the nodes' latents, so
  LlamaIndex's own ``RetrieverQueryEngine`` answers from latents.
- ``LatentCompression`` and ``LatentVectorStore`` (``integrations/vector_store.py``): an
  ``IngestionPipeline`` or ``VectorStoreIndex`` writes latent collections.
- ``LatentQueryEngine``: a ``RetrieverQueryEngine`` with a ``LatentSynthesizer``, built in one line
  from a collection; the decoder skims every passage as latents and reads ``expand`` as text.

Latents travel on the node itself (``LatentNode``, a ``TextNode`` with private attributes; why,
in ``integrations/nodes.py``), never in node metadata and never in a map beside the nodes.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

from lclm_rag.integrations.nodes import LatentNode, latents_of, to_node, to_passage, with_latents
from lclm_rag.integrations.synthesizer import LatentSynthesizer
from lclm_rag.integrations.vector_store import LatentCompression, LatentVectorStore
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import NodeWithScore, QueryBundle
from pydantic import Field, PrivateAttr

from lclm_rag.embedding import Embedder
from lclm_rag.errors import StoreError
from lclm_rag.model import LatentContextModel, load_model
from lclm_rag.query_config import QueryConfig
from lclm_rag.rag import LatentRAG, check_question, retrieve_passages
from lclm_rag.store import LatentStore

__all__ = ["LatentCompression", "LatentContextPostprocessor", "LatentNode", "LatentQueryEngine", "LatentRetriever",
           "LatentSynthesizer", "LatentVectorStore"]


class LatentRetriever(BaseRetriever):
    """Dense search in a latent collection; the hits' latents come back in the same round trip, on the nodes."""

    def __init__(self, store: LatentStore, embedder: Embedder | None = None, similarity_top_k: int = QueryConfig.top_k,
                 callback_manager: CallbackManager | None = None) -> None:
        spec = store.require()
        QueryConfig(top_k=similarity_top_k)  # the setting's one check
        self.store = store
        self.embedder = embedder or Embedder(spec.embedding_model)
        if self.embedder.dim != spec.embedding_dim:
            raise StoreError(f"embedder {self.embedder.name!r} is {self.embedder.dim}-d; the collection was built with {spec.embedding_model!r} ({spec.embedding_dim}-d)")
        self.similarity_top_k = min(similarity_top_k, max(store.count(), 1))  # a small collection: all of it
        super().__init__(callback_manager=callback_manager)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [to_node(p) for p in retrieve_passages(self.store, self.embedder, query_bundle.query_str, self.similarity_top_k)]


class LatentContextPostprocessor(BaseNodePostprocessor):
    """Attach stored latents to nodes from any retriever, by node id; compress the rest on the fly.

    The latents are for a ``LatentSynthesizer`` (or ``LatentQueryEngine``); if none of the nodes it
    gave out was read as latents when it is used again, it warns once (the answers come from the text).
    """

    compress_missing: bool = Field(default=True, description="compress nodes the collection does not hold (flagged 'computed')")
    _rag: LatentRAG = PrivateAttr()
    _given: list = PrivateAttr(default_factory=list)
    _warned: bool = PrivateAttr(default=False)

    def __init__(self, model: LatentContextModel, store: LatentStore | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._rag = LatentRAG(model, store, config=QueryConfig(compress_missing=self.compress_missing))

    @classmethod
    def class_name(cls) -> str:
        return "LatentContextPostprocessor"

    def _postprocess_nodes(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        if self._given and not self._warned and not any(n._read for n in self._given):
            self._warned = True
            warnings.warn("LatentContextPostprocessor: no LatentSynthesizer reads these latents, so the answer will come "
                          "from the text: pass response_synthesizer=LatentSynthesizer(model) to the query engine "
                          "(or use LatentQueryEngine)", UserWarning, stacklevel=3)
        passages = self._rag.complete([to_passage(n) for n in nodes])
        out = [with_latents(n, p) for n, p in zip(nodes, passages, strict=True)]
        self._given = [n.node for n in out if latents_of(n.node)[0] is not None]
        return out


class LatentQueryEngine(RetrieverQueryEngine):
    """``RetrieverQueryEngine`` with a ``LatentSynthesizer``: retrieve, postprocess, decode from latents.

    Nodes from a foreign retriever get their latents through a ``LatentContextPostprocessor``
    (added if none is given). Response metadata adds the retrieval time to the synthesizer's plan.
    ``kwargs``: the other `QueryConfig` settings (``latency_budget_s``, ``auto_threshold``, ...) and
    generation settings.
    """

    def __init__(self, retriever: BaseRetriever, model: LatentContextModel, node_postprocessors: Sequence[BaseNodePostprocessor] = (),
                 streaming: bool = False, expand: int | str = 0, expand_policy: str | None = None, token_budget: int | None = None,
                 max_new_tokens: int = QueryConfig.max_new_tokens, callback_manager: CallbackManager | None = None,
                 **kwargs: Any) -> None:
        postprocessors = list(node_postprocessors)
        store = None
        if isinstance(retriever, LatentRetriever):
            retriever.store.require(model.fingerprint())
            store = retriever.store  # latents a node lost on the way are fetched from it by node id
        elif not any(isinstance(p, LatentContextPostprocessor) for p in postprocessors):
            postprocessors.append(LatentContextPostprocessor(model))  # compresses on the fly
        synthesizer = LatentSynthesizer(model, store=store, expand=expand, expand_policy=expand_policy, token_budget=token_budget,
                                        max_new_tokens=max_new_tokens, streaming=streaming, callback_manager=callback_manager,
                                        **kwargs)
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
                        backend: str = "auto", model: LatentContextModel | str | None = None, similarity_top_k: int = QueryConfig.top_k,
                        **kwargs: Any) -> "LatentQueryEngine":
        """One line from an existing collection (embedded by name or path, qdrant-client local mode
        with ``backend="qdrant"``, or a Qdrant URL) to answers."""
        store = LatentStore.open(collection, path=path, url=url, api_key=api_key, backend=backend)
        if not isinstance(model, LatentContextModel):
            store.require()  # a missing collection fails before the model loads
            model = load_model(model)
        store.require(model.fingerprint())
        retriever = LatentRetriever(store, similarity_top_k=similarity_top_k)
        return cls.from_args(retriever, model=model, **kwargs)

    def _query(self, query_bundle: QueryBundle):
        check_question(query_bundle.query_str)
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
