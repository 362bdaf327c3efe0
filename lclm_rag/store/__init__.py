"""The latent store: one Qdrant point per passage, dense vector + latents on the same point.

Point schema
    vector ``dense``   sentence-transformers embedding, cosine, HNSW-indexed (search)
    vector ``latent``  the passage's latents, a multivector: uint8 with a scale and offset per vector
                       in a new collection (float16 where the collection was made so), MAX_SIM,
                       HNSW off (m=0): stored, never indexed; read back with the search hits
    payload            text, doc_id, source, chunk_index, start_char, end_char, num_tokens,
                       content_hash, fingerprint, ratio (+ the document's own metadata; its fields
                       named like these are kept under ``user_fields`` instead)

A collection records its compressor (fingerprint, ratio, latent width) and embedding model;
opening it with another compressor fails with a message naming both.

Backends behind one small facade (``LatentStore``), as qdrant-client does for its own:
    ``edge``          the Qdrant engine in-process (qdrant-edge-py): the embedded default
    ``qdrant``        qdrant-client: a server/cluster URL, ``:memory:`` or a local path
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lclm_rag.errors import CompressorMismatchError, InputError, StoreError
from lclm_rag.hub import lclm_home
from lclm_rag.store.base import META_FILE, Backend, CollectionSpec, StoredPassage, content_hash, directory_bytes, id_for_node, point_id
from lclm_rag.store.edge import EdgeBackend
from lclm_rag.store.qdrant import QdrantClientBackend
from lclm_rag.store.quantize import DEFAULT_LATENT_DTYPE, LATENT_DTYPES, decode, encode

COLLECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

__all__ = ["Backend", "CollectionSpec", "EdgeBackend", "LatentStore", "QdrantClientBackend", "StoredPassage",
           "content_hash", "directory_bytes", "id_for_node", "point_id"]


class LatentStore:
    """One collection of passages with latents, on any backend.

    ``LatentStore.open(name)``: the embedded default under ``$LCLM_RAG_HOME/collections``;
    ``path=``: an embedded collection in that directory; ``url=``: a Qdrant server/cluster;
    ``location=":memory:"``: qdrant-client in memory (tests); ``backend="qdrant", path=``: qdrant-client local mode.
    """

    def __init__(self, name: str, backend: Backend) -> None:
        self.name = name
        self.backend = backend
        self.spec: CollectionSpec | None = self._stored_spec()

    def _stored_spec(self) -> CollectionSpec | None:
        """The collection's spec as stored (checked), or None for a new collection. Points with no
        spec beside them are refused: taking them as new would relabel another compressor's or
        latent type's latents (read back as garbage)."""
        spec = self.backend.read_spec() if self.backend.exists() else None
        if spec is None and (stray := self.backend.stray_points()):
            edge = getattr(self.backend, "dir", None)
            where, spec_at = (edge, META_FILE) if edge else (getattr(self.backend, "location", ""), "'lclm_rag' metadata")
            raise StoreError(f"collection {self.name!r} at {where} holds {stray} point{'s' * (stray != 1)} but no collection spec "
                             f"({spec_at}): nothing says which compressor and latent type wrote them. Restore the "
                             "spec from a backup, or ingest into a new collection")
        return spec

    @classmethod
    def open(cls, name: str, *, path: str | Path | None = None, url: str | None = None, api_key: str | None = None,
             location: str | None = None, backend: str = "auto", **client_kwargs) -> "LatentStore":
        if not isinstance(name, str) or not COLLECTION_NAME.fullmatch(name):
            raise InputError(f"collection name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit (it becomes a directory name)")
        if backend not in ("auto", "edge", "qdrant"):
            raise InputError(f"backend must be 'auto', 'edge' or 'qdrant', got {backend!r}")
        if url or location == ":memory:" or backend == "qdrant":
            return cls(name, QdrantClientBackend(name, url=url, path=str(path) if path else location, api_key=api_key, **client_kwargs))
        directory = Path(path) if path else lclm_home() / "collections" / name
        return cls(name, EdgeBackend(directory))

    # -- compressor binding
    def latent_dtype_for_writes(self) -> str:
        """The collection's latent type, or, before it exists, the one a new collection gets."""
        return self.spec.latent_dtype if self.spec is not None else DEFAULT_LATENT_DTYPE

    def bind(self, spec: CollectionSpec, shard_number: int | None = None, replication_factor: int | None = None) -> None:
        """Create the collection for ``spec`` or check that it already holds the same compressor's latents."""
        if spec.latent_dtype not in LATENT_DTYPES:
            raise InputError(f"latent_dtype must be one of {LATENT_DTYPES}, got {spec.latent_dtype!r}")
        stored = self._stored_spec()
        if stored is not None:
            spec.check(stored, self.name)
            spec = dataclasses.replace(spec, latents_on_disk=stored.latents_on_disk)  # placement is the collection's
        else:
            self.backend.create(spec, shard_number, replication_factor)
        self.spec = spec

    def require(self, fingerprint: str | None = None) -> CollectionSpec:
        """The collection's spec; raises if it does not exist or belongs to another compressor."""
        if self.spec is None:
            raise StoreError(f"collection {self.name!r} does not exist (ingest into it first: lclm-rag ingest PATH --collection {shlex.quote(self.name)})")
        if fingerprint is not None and fingerprint != self.spec.fingerprint:
            raise CompressorMismatchError(
                f"collection {self.name!r} holds latents of compressor {self.spec.fingerprint}, but the model's compressor is "
                f"{fingerprint}: load the checkpoint the collection was built with, or re-ingest."
            )
        return self.spec

    # -- data
    def upsert(self, passages: Sequence[StoredPassage]) -> None:
        spec = self.require()
        for p in passages:
            if p.latents is None or p.latents.ndim != 2 or p.latents.shape[1] != spec.latent_dim:
                raise InputError(f"passage {p.id}: latents must be (n, {spec.latent_dim})")
            p.payload.setdefault("fingerprint", spec.fingerprint)
            p.payload.setdefault("ratio", spec.ratio)
            p.payload["text"] = p.text
        if passages:
            self.backend.upsert([encode(p, spec.latent_dtype) for p in passages])

    def search(self, vector: np.ndarray, top_k: int, with_latents: bool = True) -> list[StoredPassage]:
        self.require()
        if top_k <= 0:
            raise InputError(f"top_k must be positive, got {top_k}")
        return [decode(p, self.spec.latent_dtype) for p in self.backend.search(vector, top_k, with_latents)]

    def retrieve(self, ids: Sequence[str], with_latents: bool = True) -> list[StoredPassage]:
        self.require()
        return [decode(p, self.spec.latent_dtype) for p in self.backend.retrieve(ids, with_latents)] if ids else []

    def ids_of_doc(self, doc_id: str) -> set[str]:
        return self.backend.ids_of_doc(doc_id) if self.spec else set()

    def doc_ids(self) -> set[str]:
        return self.backend.doc_ids() if self.spec else set()

    def delete(self, ids: Iterable[str]) -> None:
        self.backend.delete(list(ids))

    def count(self) -> int:
        return self.backend.count() if self.spec else 0

    def disk_bytes(self) -> int | None:
        return self.backend.disk_bytes()

    def optimize(self) -> None:
        """After a bulk write: the embedded engine merges its appendable segments, where latents
        sit in RAM whatever the placement, into optimized ones that honour ``latents_on_disk``."""
        self.backend.optimize()

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "LatentStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
