"""lclm-rag: compress retrieved passages into latent embeddings once, decode from them at query time."""

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

__version__ = "0.1.0"
__all__ = [
    "LatentCompressor", "LatentConfig", "LatentContextModel", "LatentDecoder", "Projector",
    "LclmRagError", "CheckpointError", "CompressorMismatchError", "ConfigError", "InputError",
    "ModelNotFoundError", "StoreError",
]
