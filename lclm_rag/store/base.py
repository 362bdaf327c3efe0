"""What every storage engine stores and how: the point schema, the collection spec, point ids, and
the abstract backend each engine implements (the same tests run on every one)."""

from __future__ import annotations

import hashlib
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lclm_rag.errors import CompressorMismatchError

DENSE = "dense"
LATENT = "latent"
META_FILE = "lclm_collection.json"
ID_NAMESPACE = uuid.UUID("6f1c1d7e-54a4-4c1e-9f57-4f1b2e0b7c11")
INDEXED_FIELDS = ("doc_id", "fingerprint")


@dataclass(frozen=True)
class CollectionSpec:
    """What a collection is made of; stored with it and checked on every open."""

    fingerprint: str  # compressor fingerprint (LatentCompressor.fingerprint())
    ratio: int
    latent_dim: int  # encoder hidden size
    embedding_model: str
    embedding_dim: int
    schema_version: int = 1
    latent_dtype: str = "float16"  # how latents are stored: "float16" or "uint8" (store/quantize.py)
    latents_on_disk: bool = False  # latents memory-mapped and read for the hits only; the dense index stays in RAM

    def check(self, stored: "CollectionSpec", collection: str) -> None:
        if stored.fingerprint != self.fingerprint or stored.ratio != self.ratio or stored.latent_dim != self.latent_dim:
            raise CompressorMismatchError(
                f"collection {collection!r} holds latents of compressor {stored.fingerprint} (ratio {stored.ratio}, "
                f"width {stored.latent_dim}); this compressor is {self.fingerprint} (ratio {self.ratio}, width "
                f"{self.latent_dim}). Use the collection's compressor, or ingest into a new collection."
            )
        if stored.latent_dtype != self.latent_dtype:
            raise CompressorMismatchError(
                f"collection {collection!r} stores latents as {stored.latent_dtype}, not {self.latent_dtype}: one collection "
                "never mixes types (ingest into a new collection for another type)"
            )
        if stored.embedding_model != self.embedding_model or stored.embedding_dim != self.embedding_dim:
            raise CompressorMismatchError(
                f"collection {collection!r} was embedded with {stored.embedding_model!r} ({stored.embedding_dim}-d), "
                f"not {self.embedding_model!r} ({self.embedding_dim}-d)"
            )


@dataclass
class StoredPassage:
    """One point: what ingestion writes and retrieval returns."""

    id: str
    text: str
    payload: dict[str, Any]
    dense: np.ndarray | None = None
    latents: torch.Tensor | None = None  # (n, latent_dim) float32 (stored as the collection's latent_dtype)
    score: float | None = None


def content_hash(text: str) -> str:
    """The passage-text hash stored in the payload and folded into point ids (change detection)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def point_id(doc_id: str, chunk_index: int, content_hash: str) -> str:
    """Deterministic id: re-ingesting the same chunk of the same document hits the same point."""
    return str(uuid.uuid5(ID_NAMESPACE, f"{doc_id}\x00{chunk_index}\x00{content_hash}"))


def id_for_node(node_id: str) -> str:
    """Point id of a LlamaIndex node stored as one passage: its own id if a UUID, else a UUID5 of it."""
    try:
        return str(uuid.UUID(str(node_id)))
    except ValueError:
        return str(uuid.uuid5(ID_NAMESPACE, f"node\x00{node_id}"))


def _latents_to_rows(latents: torch.Tensor) -> np.ndarray:
    return latents.detach().to("cpu", torch.float32).numpy()


def _rows_to_latents(rows: Any) -> torch.Tensor:
    return torch.from_numpy(np.asarray(rows, dtype=np.float32))


def _to_passage(rec, with_latents: bool, score: float | None = None) -> StoredPassage:
    """A record or scored point of either engine (same attribute names) as a StoredPassage."""
    payload = dict(rec.payload or {})
    latents = _rows_to_latents(rec.vector[LATENT]) if with_latents and rec.vector else None
    return StoredPassage(id=str(rec.id), text=payload.get("text", ""), payload=payload, latents=latents, score=score)


def directory_bytes(directory: str | Path) -> int:
    """Allocated bytes under a directory (blocks, not apparent size: engines pre-allocate sparse files)."""
    return sum(p.stat().st_blocks * 512 for p in Path(directory).rglob("*") if p.is_file())


class Backend(ABC):
    """What a storage engine must do. Ids are UUID strings; filters are on doc_id only."""

    @abstractmethod
    def exists(self) -> bool: ...
    @abstractmethod
    def create(self, spec: CollectionSpec, shard_number: int | None, replication_factor: int | None) -> None: ...
    @abstractmethod
    def read_spec(self) -> CollectionSpec | None: ...
    @abstractmethod
    def upsert(self, passages: Sequence[StoredPassage]) -> None: ...
    @abstractmethod
    def search(self, vector: np.ndarray, limit: int, with_latents: bool) -> list[StoredPassage]: ...
    @abstractmethod
    def retrieve(self, ids: Sequence[str], with_latents: bool) -> list[StoredPassage]: ...
    @abstractmethod
    def scroll_doc_ids(self, doc_id: str | None = None) -> Iterable:
        """Every point (id and ``doc_id`` payload), or only those of one document."""
    @abstractmethod
    def delete(self, ids: Sequence[str]) -> None: ...
    @abstractmethod
    def count(self) -> int: ...
    @abstractmethod
    def disk_bytes(self) -> int | None: ...
    @abstractmethod
    def close(self) -> None: ...

    def flush(self) -> None:
        """Make written points durable (engines that write through need nothing)."""

    def optimize(self) -> None:
        """Merge freshly written segments into optimized ones (engines that do it themselves need nothing)."""

    def ids_of_doc(self, doc_id: str) -> set[str]:
        return {str(r.id) for r in self.scroll_doc_ids(doc_id)}

    def doc_ids(self) -> set[str]:
        return {r.payload["doc_id"] for r in self.scroll_doc_ids() if r.payload and "doc_id" in r.payload}
