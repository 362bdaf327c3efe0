"""What every storage engine stores and how: the point schema, the collection spec, point ids, and
the abstract backend each engine implements (the same tests run on every one)."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lclm_rag.errors import CompressorMismatchError, StoreError

DENSE = "dense"
LATENT = "latent"
META_FILE = "lclm_collection.json"
ID_NAMESPACE = uuid.UUID("6f1c1d7e-54a4-4c1e-9f57-4f1b2e0b7c11")
INDEXED_FIELDS = ("doc_id", "fingerprint")
LATENT_DTYPES = ("float16", "uint8")
# payload keys the system writes and reads; a document's own field of the same name never replaces one
SYSTEM_FIELDS = frozenset({"text", "doc_id", "source", "chunk_index", "start_char", "end_char", "num_tokens", "content_hash",
                           "fingerprint", "ratio", "latent_scale", "latent_offset", "node_id", "key_terms"})
USER_FIELDS = "user_fields"  # where a document's fields named like system ones are kept


def with_user_fields(system: dict[str, Any], user: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A point's payload: the document's own fields beside the system's, except those named like a
    system field (or ``user_fields``), which go under ``user_fields`` instead of replacing it.
    Returns the payload and the names moved (to report them)."""
    clash = sorted(k for k in user if k in SYSTEM_FIELDS or k == USER_FIELDS)
    payload = {k: v for k, v in user.items() if k not in clash}
    payload.update(system)
    if clash:
        payload[USER_FIELDS] = {k: user[k] for k in clash}
    return payload, clash


@dataclass(frozen=True)
class CollectionSpec:
    """What a collection is made of; stored with it and checked on every open."""

    fingerprint: str  # compressor fingerprint (LatentCompressor.fingerprint())
    ratio: int
    latent_dim: int  # encoder hidden size
    embedding_model: str
    embedding_dim: int
    schema_version: int = 1
    latent_dtype: str = "float16"  # how latents are stored: "float16" or "uint8" (store/quantize.py); a spec file
    # without the field predates uint8 and holds float16, so that is the default when reading one; new collections
    # are created as uint8 (`LatentStore.latent_dtype_for_writes`)
    latents_on_disk: bool = False  # latents memory-mapped and read for the hits only; the dense index stays in RAM

    @classmethod
    def from_stored(cls, data: Any, where: str) -> "CollectionSpec":
        """A spec read back from storage, checked: a damaged or hand-edited spec file is refused
        with its path, never taken as some other compressor or latent type."""
        fix = ("it records which compressor and latent type wrote the collection: restore it from a backup, or "
               "ingest into a new collection")
        if not isinstance(data, dict):
            raise StoreError(f"{where} does not hold a collection spec (a JSON object): {fix}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = {name for name, f in fields.items() if f.default is dataclasses.MISSING}
        if data.keys() - fields.keys() or required - data.keys():
            raise StoreError(f"{where} has keys {sorted(data)}, not the collection spec's (missing "
                             f"{sorted(required - data.keys())}, unknown {sorted(data.keys() - fields.keys())}): {fix}")
        types = {"fingerprint": str, "embedding_model": str, "latent_dtype": str, "latents_on_disk": bool}
        for name, value in data.items():
            want = types.get(name, int)
            if not isinstance(value, want) or (want is int and (isinstance(value, bool) or value <= 0)):
                raise StoreError(f"{where}: {name} is {value!r}, not a{' positive' if want is int else ''} "
                                 f"{want.__name__}: {fix}")
        if data.get("latent_dtype", "float16") not in LATENT_DTYPES:
            raise StoreError(f"{where}: latent_dtype is {data['latent_dtype']!r}, not one of {LATENT_DTYPES}: {fix}")
        return cls(**data)

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

    def stray_points(self) -> int:
        """Points stored where no collection spec is (a deleted spec file): such a collection is
        refused, since nothing says which compressor and latent type wrote them."""
        return 0

    def flush(self) -> None:
        """Make written points durable (engines that write through need nothing)."""

    def optimize(self) -> None:
        """Merge freshly written segments into optimized ones (engines that do it themselves need nothing)."""

    def ids_of_doc(self, doc_id: str) -> set[str]:
        return {str(r.id) for r in self.scroll_doc_ids(doc_id)}

    def doc_ids(self) -> set[str]:
        return {r.payload["doc_id"] for r in self.scroll_doc_ids() if r.payload and "doc_id" in r.payload}
