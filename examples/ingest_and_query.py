"""Ingest a folder into an embedded latent collection, then ask questions with the drop-in engine.

    .venv/bin/python examples/ingest_and_query.py [DOCS_DIR] [--store DIR] [--engine vllm | --decoder-url URL]

Runs offline on the packaged defaults (SmolLM2-135M-Instruct compressor/decoder, all-MiniLM-L6-v2).
``--engine vllm`` decodes in vLLM in this process (hence the ``__main__`` guard: vLLM starts
worker processes); ``--decoder-url`` on a ``vllm serve --enable-prompt-embeds`` server.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from lclm_rag.ingest import Ingestor
from lclm_rag.integrations.llama_index import LatentQueryEngine, LatentRetriever

from lclm_rag.embedding import Embedder
from lclm_rag.model import load_model
from lclm_rag.store import LatentStore

QUESTIONS = [
    "Who is the Eiffel Tower named after?",
    "Where does photosynthesis take place in plants?",
    "When did Apollo 11 land on the Moon?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("docs", nargs="?", default=str(Path(__file__).parent / "docs"))
    parser.add_argument("--store", default=None, help="collection directory (default: a temporary one)")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--decoder-url", default=None, help="a vLLM server, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--engine-args", type=json.loads, default={}, help='vllm.LLM settings, e.g. \'{"enforce_eager": true}\'')
    args = parser.parse_args()

    store_dir = Path(args.store) if args.store else Path(tempfile.mkdtemp()) / "examples"
    model = load_model(args.checkpoint).use_engine(args.engine, **({"url": args.decoder_url} if args.decoder_url else args.engine_args))
    embedder = Embedder()
    with LatentStore.open("examples", path=store_dir) as store:
        report = Ingestor(store, model.compressor, embedder, chunk_tokens=128).ingest_paths([args.docs], progress=False)
        print(report.summary())

        # one line changes from LlamaIndex's RetrieverQueryEngine.from_args(retriever=...)
        engine = LatentQueryEngine.from_args(retriever=LatentRetriever(store, embedder, similarity_top_k=3), model=model,
                                             expand=1, max_new_tokens=32)
        for question in QUESTIONS:
            response = engine.query(question)
            modes = [p["mode"] for p in response.metadata["passages"]]
            print(f"Q: {question}\nA: {response.response}\n   sources {[round(n.score, 3) for n in response.source_nodes]} "
                  f"as {modes}, {response.metadata['prompt_positions']} decoder positions")


if __name__ == "__main__":
    main()
