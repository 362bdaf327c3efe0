"""lclm-rag: compress retrieved passages into latent embeddings once, decode from them at query time.

The layers, each importing only from those before it:

- model: ``config``, ``compressor``, ``projector``, ``prompt``, ``decoder``, ``model``, ``checkpoint``
  (with ``hub`` and ``errors`` beneath them);
- rag: ``chunking``, ``embedding``, ``store`` (one backend per engine behind an abstract base),
  ``ingest`` (the top-level ``ingest/`` folder, installed as ``lclm_rag.ingest``), ``planning``;
- integrations: ``lclm_rag.integrations.llama_index`` (the top-level ``integrations/`` folder; the
  ``llama-index`` extra);
- on top: ``training`` and ``evaluation`` (packages of one-job modules), and the ``cli``.

``Ingestor`` and the LlamaIndex classes are imported on first use, so ``import lclm_rag`` stays light.
"""

from lclm_rag.compressor import LatentCompressor
from lclm_rag.config import LatentConfig
from lclm_rag.decoder import LatentDecoder
from lclm_rag.errors import (
    CheckpointError,
    CompressorMismatchError,
    ConfigError,
    InputError,
    LclmRagError,
    ModelNotFoundError,
    StoreError,
)
from lclm_rag.model import LatentContextModel
from lclm_rag.projector import Projector
from lclm_rag.store import LatentStore

__version__ = "0.1.0"
_LAZY = {
    "Embedder": "lclm_rag.embedding",
    "Ingestor": "lclm_rag.ingest",
    "LatentQueryEngine": "lclm_rag.integrations.llama_index",
    "LatentRetriever": "lclm_rag.integrations.llama_index",
    "LatentContextPostprocessor": "lclm_rag.integrations.llama_index",
}
__all__ = [
    "LatentCompressor", "LatentConfig", "LatentContextModel", "LatentDecoder", "LatentStore", "Projector", *_LAZY,
    "LclmRagError", "CheckpointError", "CompressorMismatchError", "ConfigError", "InputError",
    "ModelNotFoundError", "StoreError",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lclm_rag' has no attribute {name!r}")
