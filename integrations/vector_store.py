"""LlamaIndex ingestion that writes latents: ``LatentCompression`` and ``LatentVectorStore``.

    pipeline = IngestionPipeline(transformations=[SentenceSplitter(), embed_model, LatentCompression(model)],
                                 vector_store=LatentVectorStore(LatentStore.open("docs"), model, embed_model.model_name),
                                 docstore=SimpleDocumentStore())
    pipeline.run(documents=docs)

``LatentCompression`` compresses each node's text once and leaves the latents in the cache;
``LatentVectorStore`` writes every node as one point of a latent collection (the dense vector the
pipeline computed, the latents, the payload), under the same collection spec and compressor
check as ``lclm-rag ingest``, so ``lclm-rag query``, ``LatentRetriever`` and ``LatentSynthesizer``
read it. A node's point id is derived from its node id (as for ``Ingestor.ingest_documents`` with
``split=False``), so writing a node again replaces it; ``delete(ref_doc_id)`` removes a document's
points, which is what the pipeline's docstore strategies call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from lclm_rag.integrations.cache import SHARED_CACHE, LatentCache, fill
from llama_index.core.schema import BaseNode, TextNode, TransformComponent
from llama_index.core.vector_stores.types import BasePydanticVectorStore, VectorStoreQuery, VectorStoreQueryResult
from pydantic import PrivateAttr

from lclm_rag.errors import InputError
from lclm_rag.model import LatentContextModel
from lclm_rag.store import CollectionSpec, LatentStore, StoredPassage, content_hash, id_for_node


class LatentCompression(TransformComponent):
    """Compress every node's text into latents (once); the nodes pass through unchanged."""

    batch_size: int = 16
    _model: LatentContextModel = PrivateAttr()
    _cache: LatentCache = PrivateAttr()

    def __init__(self, model: LatentContextModel, cache: LatentCache | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._model, self._cache = model, cache or SHARED_CACHE

    @classmethod
    def class_name(cls) -> str:
        return "LatentCompression"

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        todo = [n for n in nodes if self._cache.get(n.node_id) is None and n.get_content().strip()]
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            for node, latents in zip(batch, self._model.compress([n.get_content() for n in batch], batch_size=self.batch_size)):
                self._cache.put(node.node_id, latents, "computed")
        return nodes


class LatentVectorStore(BasePydanticVectorStore):
    """A latent collection as a LlamaIndex vector store: dense vector and latents on one point."""

    stores_text: bool = True
    flat_metadata: bool = True
    embedding_model: str  # the sentence-transformers model that made the node embeddings (queries use it too)
    _store: LatentStore = PrivateAttr()
    _model: LatentContextModel = PrivateAttr()
    _cache: LatentCache = PrivateAttr()

    def __init__(self, store: LatentStore, model: LatentContextModel, embedding_model: str,
                 cache: LatentCache | None = None, **kwargs: Any) -> None:
        super().__init__(embedding_model=embedding_model, **kwargs)
        self._store, self._model, self._cache = store, model, cache or SHARED_CACHE
        if store.spec is not None:
            store.require(model.fingerprint())

    @classmethod
    def class_name(cls) -> str:
        return "LatentVectorStore"

    @property
    def client(self) -> LatentStore:
        return self._store

    def _bind(self, dim: int) -> None:
        c = self._model.compressor
        self._store.bind(CollectionSpec(fingerprint=c.fingerprint(), ratio=c.config.ratio, latent_dim=c.config.encoder_hidden_size,
                                        embedding_model=self.embedding_model, embedding_dim=dim,
                                        latent_dtype=self._store.latent_dtype_for_writes()))

    def add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[str]:
        nodes = [n for n in nodes if n.get_content().strip()]
        if not nodes:
            return []
        if any(n.embedding is None for n in nodes):
            raise InputError("LatentVectorStore needs embedded nodes: put an embedding model in the transformations")
        self._bind(len(nodes[0].embedding))
        fill(self._cache, nodes, self._model)  # nodes LatentCompression did not see
        positions: dict[str, int] = {}
        passages = []
        for node in nodes:
            doc_id = node.ref_doc_id or node.node_id
            index = positions[doc_id] = positions.get(doc_id, -1) + 1
            text = node.get_content()
            meta = {k: v for k, v in (node.metadata or {}).items() if isinstance(v, (str, int, float, bool))}
            payload = {**meta, "doc_id": doc_id, "node_id": node.node_id, "source": meta.get("file_path", "llama_index"),
                       "chunk_index": index, "start_char": node.start_char_idx, "end_char": node.end_char_idx,
                       "content_hash": content_hash(text)}
            vector = np.asarray(node.embedding, dtype=np.float32)
            passages.append(StoredPassage(id_for_node(node.node_id), text, payload, vector / max(np.linalg.norm(vector), 1e-12),
                                          self._cache.get(node.node_id)[0]))
        self._store.upsert(passages)
        return [n.node_id for n in nodes]

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        self._store.delete(self._store.ids_of_doc(ref_doc_id))

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        if query.query_embedding is None:
            raise InputError("LatentVectorStore answers dense queries: give the index an embedding model")
        hits = self._store.search(np.asarray(query.query_embedding, dtype=np.float32), query.similarity_top_k, with_latents=True)
        nodes = []
        for hit in hits:
            meta = {k: v for k, v in hit.payload.items() if k != "text"}
            node_id = hit.payload.get("node_id", hit.id)
            nodes.append(TextNode(id_=node_id, text=hit.text, metadata=meta, excluded_llm_metadata_keys=list(meta),
                                  excluded_embed_metadata_keys=list(meta)))
            self._cache.put(node_id, hit.latents, "stored")
        return VectorStoreQueryResult(nodes=nodes, similarities=[h.score for h in hits], ids=[n.node_id for n in nodes])
