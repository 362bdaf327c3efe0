"""lclm-rag: compress retrieved passages into latent embeddings once, decode from them at query time.

The layers, each importing only from those before it:

- model: ``config``, ``compressor``, ``projector``, ``prompt``, ``decoder``, ``model``, ``checkpoint``
  (with ``hub`` and ``errors`` beneath them);
- rag: ``chunking``, ``embedding``, ``store`` (one backend per engine behind an abstract base),
  ``ingest`` (the top-level ``ingest/`` folder, installed as ``lclm_rag.ingest``), and the query
  path: ``policies``, ``query_config``, ``planning``, ``rag`` (``LatentRAG``);
- integrations: ``lclm_rag.integrations.llama_index`` (the top-level ``integrations/`` folder; the
  ``llama-index`` extra);
- on top: ``training`` and ``evaluation`` (packages of one-job modules), and the ``cli``.

The classes are imported on first use, so ``import lclm_rag`` (and a CLI call that fails on its
arguments) stays light: torch, transformers and LlamaIndex load only when something needs them.
"""

from lclm_rag.config import LatentConfig
from lclm_rag.errors import (
    CheckpointError,
    CompressorMismatchError,
    ConfigError,
    InputError,
    LclmRagError,
    ModelNotFoundError,
    StoreError,
)

__version__ = "0.1.0"
_LAZY = {
    "LatentCompressor": "lclm_rag.compressor",
    "LatentDecoder": "lclm_rag.decoder",
    "LatentContextModel": "lclm_rag.model",
    "Projector": "lclm_rag.projector",
    "LatentStore": "lclm_rag.store",
    "Embedder": "lclm_rag.embedding",
    "Ingestor": "lclm_rag.ingest",
    "LatentRAG": "lclm_rag.rag",
    "QueryConfig": "lclm_rag.query_config",
    "LatentQueryEngine": "lclm_rag.integrations.llama_index",
    "LatentRetriever": "lclm_rag.integrations.llama_index",
    "LatentContextPostprocessor": "lclm_rag.integrations.llama_index",
}
__all__ = [
    "LatentConfig", *_LAZY,
    "LclmRagError", "CheckpointError", "CompressorMismatchError", "ConfigError", "InputError",
    "ModelNotFoundError", "StoreError",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lclm_rag' has no attribute {name!r}")
