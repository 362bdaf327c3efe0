"""LlamaIndex ingestion that writes latents: ``LatentCompression`` and ``LatentVectorStore``.

    pipeline = IngestionPipeline(transformations=[SentenceSplitter(), embed_model, LatentCompression(model)],
                                 vector_store=LatentVectorStore(LatentStore.open("docs"), model, embed_model.model_name),
                                 docstore=SimpleDocumentStore())
    pipeline.run(documents=docs)

``LatentCompression`` compresses each node's text once and returns the nodes carrying their
latents (``LatentNode``, `integrations/nodes.py`);
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
from lclm_rag.integrations.nodes import LatentNode, latents_of, to_node
from llama_index.core.schema import BaseNode, TextNode, TransformComponent
from llama_index.core.vector_stores.types import BasePydanticVectorStore, VectorStoreQuery, VectorStoreQueryResult
from pydantic import PrivateAttr

from lclm_rag.errors import InputError
from lclm_rag.model import LatentContextModel
from lclm_rag.planning import Passage
from lclm_rag.store import CollectionSpec, LatentStore, StoredPassage, content_hash, id_for_node


class LatentCompression(TransformComponent):
    """Compress every text node's text into latents (once); the nodes come back, the same ids, text
    and metadata, carrying them."""

    batch_size: int = 16
    _model: LatentContextModel = PrivateAttr()

    def __init__(self, model: LatentContextModel, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._model = model

    @classmethod
    def class_name(cls) -> str:
        return "LatentCompression"

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        return carry_latents(self._model, nodes, self.batch_size)


class LatentVectorStore(BasePydanticVectorStore):
    """A latent collection as a LlamaIndex vector store: dense vector and latents on one point."""

    stores_text: bool = True
    flat_metadata: bool = True
    embedding_model: str  # the sentence-transformers model that made the node embeddings (queries use it too)
    _store: LatentStore = PrivateAttr()
    _model: LatentContextModel = PrivateAttr()

    def __init__(self, store: LatentStore, model: LatentContextModel, embedding_model: str, **kwargs: Any) -> None:
        super().__init__(embedding_model=embedding_model, **kwargs)
        self._store, self._model = store, model
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
        nodes = carry_latents(self._model, nodes)  # nodes LatentCompression did not see (or that lost their latents)
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
                                          latents_of(node)[0]))
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
            scored = to_node(Passage(hit.payload.get("node_id", hit.id), hit.text, hit.score, hit.latents, "stored", payload=hit.payload))
            nodes.append(scored.node)
        return VectorStoreQueryResult(nodes=nodes, similarities=[h.score for h in hits], ids=[n.node_id for n in nodes])


def carry_latents(model: LatentContextModel, nodes: Sequence[BaseNode], batch_size: int = 16) -> list[BaseNode]:
    """The nodes, each text node carrying latents: its own, else its text compressed now (in batches)."""
    out = list(nodes)
    todo = [i for i, n in enumerate(out) if isinstance(n, TextNode) and latents_of(n)[0] is None and n.get_content().strip()]
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        for i, latents in zip(batch, model.compress([out[i].get_content() for i in batch], batch_size=batch_size), strict=True):
            out[i] = LatentNode.carrying(out[i], latents, "computed")
    return out
