"""LlamaIndex's own parts end to end: an IngestionPipeline writes a latent collection, and the
standard RetrieverQueryEngine answers from its latents through LatentSynthesizer.

    .venv/bin/python examples/llamaindex_pipeline_and_query_engine.py [DOCS_DIR] [--store DIR]

Runs offline on the packaged defaults. The collection is an ordinary lclm-rag collection:
`lclm-rag query "..." --collection docs --path DIR` reads it too.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lclm_rag.integrations.llama_index import LatentCompression, LatentSynthesizer, LatentVectorStore
from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.storage.docstore import SimpleDocumentStore
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
    store_dir = Path(args.store or tempfile.mkdtemp(prefix="lclm-rag-pipeline-")) / "docs"

    model = load_model()  # the packaged smollm2-135m-r4
    embed_model = HuggingFaceEmbedding(model_name=resolve_model(DEFAULT_EMBEDDER))
    vector_store = LatentVectorStore(LatentStore.open("docs", path=store_dir), model, DEFAULT_EMBEDDER)
    pipeline = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=128, chunk_overlap=16), embed_model, LatentCompression(model)],
                                 vector_store=vector_store, docstore=SimpleDocumentStore())
    nodes = pipeline.run(documents=SimpleDirectoryReader(args.docs, filename_as_id=True).load_data())
    print(f"{len(nodes)} passages compressed once and stored in {store_dir}")

    index = VectorStoreIndex.from_vector_store(vector_store, embed_model=embed_model)
    engine = RetrieverQueryEngine(retriever=index.as_retriever(similarity_top_k=3),
                                  response_synthesizer=LatentSynthesizer(model, expand=1, max_new_tokens=24))
    for question in QUESTIONS:
        response = engine.query(question)
        modes = [p["mode"] for p in response.metadata["passages"]]
        print(f"Q: {question}\nA: {response.response}   (passages: {modes}, {response.metadata['prompt_positions']} positions)")
    vector_store.client.close()


if __name__ == "__main__":
    main()
