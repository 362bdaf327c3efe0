"""Add latent context to an existing LlamaIndex + Qdrant index with one postprocessor.

    .venv/bin/python examples/postprocessor_with_llamaindex_qdrant.py [DOCS_DIR]

The index is plain LlamaIndex (SimpleDirectoryReader, SentenceSplitter, QdrantVectorStore,
VectorStoreIndex). Its nodes are compressed once into a latent collection keyed by node id; at
query time ``LatentContextPostprocessor`` attaches their stored latents, and
``LatentQueryEngine`` answers from them. Runs offline on the packaged defaults.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from lclm_rag.ingest import Ingestor
from lclm_rag.integrations.llama_index import LatentContextPostprocessor, LatentQueryEngine
from llama_index.core import Settings, SimpleDirectoryReader, StorageContext, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter
from llama_index.embeddings.huggingface import HuggingFaceEmbedding
from llama_index.vector_stores.qdrant import QdrantVectorStore
from qdrant_client import QdrantClient

from lclm_rag.embedding import Embedder
from lclm_rag.hub import DEFAULT_EMBEDDER, resolve_model
from lclm_rag.model import load_model
from lclm_rag.store import LatentStore


def main() -> None:
    docs_dir = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent / "docs")
    workdir = Path(tempfile.mkdtemp())

    # --- an ordinary LlamaIndex index over Qdrant ---
    Settings.embed_model = HuggingFaceEmbedding(model_name=resolve_model(DEFAULT_EMBEDDER))
    Settings.llm = None
    nodes = SentenceSplitter(chunk_size=128, chunk_overlap=16).get_nodes_from_documents(SimpleDirectoryReader(docs_dir).load_data())
    client = QdrantClient(path=str(workdir / "qdrant"))
    vector_store = QdrantVectorStore(client=client, collection_name="docs")
    index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=vector_store))

    # --- compress the same nodes once, keyed by node id ---
    model = load_model()
    latent_store = LatentStore.open("docs-latents", path=workdir / "latents")
    report = Ingestor(latent_store, model.compressor, Embedder()).ingest_documents(nodes, split=False)
    print(f"compressed {report.written} nodes")

    postprocessor = LatentContextPostprocessor(model=model, store=latent_store)
    engine = LatentQueryEngine.from_args(retriever=index.as_retriever(similarity_top_k=3),
                                         node_postprocessors=[postprocessor], model=model, max_new_tokens=32)
    response = engine.query("What do coral polyps build?")
    print("A:", response.response)
    for n, info in zip(response.source_nodes, response.metadata["passages"]):
        print(f"  {n.score:.3f} {info['mode']:>6} latents={info['latent_source']:<8} {n.node.get_content()[:60]!r}")
    latent_store.close()
    client.close()


if __name__ == "__main__":
    main()
