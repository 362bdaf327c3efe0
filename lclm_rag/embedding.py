"""Retrieval embeddings (sentence-transformers), shared by ingestion and query."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lclm_rag.hub import DEFAULT_EMBEDDER, resolve_model


class Embedder:
    """A sentence-transformers model; normalised vectors (cosine = dot)."""

    def __init__(self, name_or_path: str = DEFAULT_EMBEDDER, device: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.name = str(name_or_path)
        self.model = SentenceTransformer(resolve_model(name_or_path), device=device)
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False).astype(np.float32)
