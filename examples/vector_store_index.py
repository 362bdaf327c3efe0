"""VectorStoreIndex.from_documents builds a latent collection, and the standard
RetrieverQueryEngine over the index's retriever answers from the latents with LatentSynthesizer.

    .venv/bin/python examples/vector_store_index.py [DOCS_DIR] [--store DIR]

Runs offline on the packaged defaults. The index's vector store is a LatentVectorStore: each node
is embedded for retrieval and compressed once (LatentCompression) on its way in, and both go on
the same Qdrant point, so `lclm-rag query "..." --collection index --path DIR` reads it too.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lclm_rag.integrations.llama_index import LatentCompression, LatentSynthesizer, LatentVectorStore
from llama_index.core import SimpleDirectoryReader, StorageContext, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.embeddings.huggingface import HuggingFaceEmbedding

from lclm_rag.hub import DEFAULT_EMBEDDER, resolve_model
from lclm_rag.model import load_model
from lclm_rag.store import LatentStore

QUESTIONS = ["Who is the Eiffel Tower named after?", "When did Apollo 11 land on the Moon?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("docs", nargs="?", default=str(Path(__file__).parent / "docs"))
    parser.add_argument("--store", default=None, help="collection directory (default: a temporary one)")
    args = parser.parse_args()
    store_dir = Path(args.store or tempfile.mkdtemp(prefix="lclm-rag-index-")) / "index"

    model = load_model()  # the packaged smollm2-135m-r4
    vector_store = LatentVectorStore(LatentStore.open("index", path=store_dir), model, DEFAULT_EMBEDDER)
    index = VectorStoreIndex.from_documents(
        SimpleDirectoryReader(args.docs, filename_as_id=True).load_data(),
        storage_context=StorageContext.from_defaults(vector_store=vector_store),
        embed_model=HuggingFaceEmbedding(model_name=resolve_model(DEFAULT_EMBEDDER)),
        transformations=[SentenceSplitter(chunk_size=128, chunk_overlap=16), LatentCompression(model)],
    )
    print(f"{vector_store.client.count()} passages compressed once and stored in {store_dir}")

    # index.as_query_engine() would also build an LLM from Settings (OpenAI by default); the latent
    # synthesizer is the reader here, so the engine is put together from the index's retriever
    engine = RetrieverQueryEngine(retriever=index.as_retriever(similarity_top_k=3),
                                  response_synthesizer=LatentSynthesizer(model, expand=1, max_new_tokens=24))
    for question in QUESTIONS:
        response = engine.query(question)
        modes = [p["mode"] for p in response.metadata["passages"]]
        print(f"Q: {question}\nA: {response.response}   (passages: {modes}, {response.metadata['prompt_positions']} positions)")
    vector_store.client.close()


if __name__ == "__main__":
    main()
