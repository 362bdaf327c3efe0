"""The embedded default: Qdrant's engine in-process (qdrant-edge-py), one process at a time."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lclm_rag.errors import StoreError
from lclm_rag.store.base import (
    DENSE,
    INDEXED_FIELDS,
    LATENT,
    META_FILE,
    Backend,
    CollectionSpec,
    _latents_to_rows,
    _to_passage,
    directory_bytes,
)

LOCK_FILE = ".lclm-rag.lock"


def _engine_failure(exc: BaseException) -> bool:
    """An error the engine raised: a plain Exception, or a Rust panic (pyo3's PanicException is a
    BaseException, so it would pass ``except Exception`` as a raw traceback)."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def return_freed_heap() -> bool:
    """Give the heap the engine freed back to the OS (glibc ``malloc_trim``); False where there is none.

    Loading a shard allocates and frees about 0.6 GB of scratch (measured on 20k and 100k
    passages alike); glibc keeps the freed pages mapped, so without this an open collection
    holds that much resident memory for nothing, and the kernel cannot reclaim it.
    """
    import ctypes

    try:
        process = ctypes.CDLL(None)  # the symbols already loaded, the C library's among them
    except (OSError, TypeError):  # Windows
        return False
    if not hasattr(process, "malloc_trim"):  # musl, macOS
        return False
    process.malloc_trim(0)
    return True


class EdgeBackend(Backend):
    """Qdrant's engine in-process (qdrant-edge-py): latents in the collection's type, WAL-protected.

    One process at a time, readers included: an OS-level lock (``flock`` on a file inside the
    collection directory) is taken before the engine touches the shard, so a second process is
    refused with a clear error and never disturbs the one that holds it. The lock goes with the
    process (close, exit or kill). Concurrent workers use a Qdrant server (``--qdrant-url``).
    """

    def __init__(self, directory: Path) -> None:
        import qdrant_edge as qe

        self.qe = qe
        self.dir = directory
        self.shard = None
        self._lock = None
        if directory.exists():
            if not directory.is_dir():
                raise StoreError(f"{directory} is a file, not a collection directory: choose another --path")
            self._acquire()
            self._load()

    # -- the cross-process lock
    def _acquire(self) -> None:
        import fcntl
        import os

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fh = open(self.dir / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the lifetime of the backend
        except OSError as exc:
            raise StoreError(f"cannot use {self.dir} for a collection: {exc.strerror or exc} (choose another --path "
                             "or LCLM_RAG_HOME)") from exc
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise StoreError(f"the embedded collection at {self.dir} is open in another process ({holder}): one process "
                             "at a time; wait for it, or use a Qdrant server (--qdrant-url) for concurrent access") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._lock = fh

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    def _load(self) -> None:
        if not (self.dir / "edge_config.json").exists():
            if any(p.name != LOCK_FILE for p in self.dir.iterdir()):
                self._release()
                if (self.dir / META_FILE).exists() or (self.dir / "segments").exists():
                    raise StoreError(f"the embedded collection at {self.dir} has lost its edge_config.json. {self._fix()}")
                raise StoreError(f"{self.dir} holds other files and no collection: choose an empty or new --path")
            return
        try:
            self.shard = self.qe.EdgeShard.load(str(self.dir))
        except BaseException as exc:  # the engine raises plain Exception, or panics
            if not _engine_failure(exc):
                raise
            self._release()
            raise StoreError(f"cannot open the embedded collection at {self.dir}: {exc}. {self._fix()}") from exc
        return_freed_heap()

    def _fix(self) -> str:
        return (f"Its files may be damaged or from another engine version: restore {self.dir} from a backup, "
                "or move it away and ingest again")

    def _engine(self, what: str, fn, *args):
        """Call the engine; a failure (a truncated payload page or vector file, ...) becomes one
        StoreError naming the collection's directory and the fix, not an engine traceback."""
        try:
            return fn(*args)
        except BaseException as exc:
            if not _engine_failure(exc):
                raise
            raise StoreError(f"the embedded collection at {self.dir} failed to {what}: {str(exc).strip()[:500]}. "
                             f"{self._fix()}") from exc

    def exists(self) -> bool:
        return self.shard is not None and (self.dir / META_FILE).exists()

    def create(self, spec, shard_number=None, replication_factor=None) -> None:
        qe = self.qe
        if self._lock is None:  # a new collection: lock first, then see whether another process made it meanwhile
            self._acquire()
            self._load()
        if self.shard is None:
            config = qe.EdgeConfig(vectors={
                DENSE: qe.EdgeVectorParams(size=spec.embedding_dim, distance=qe.Distance.Cosine),
                LATENT: qe.EdgeVectorParams(
                    size=spec.latent_dim,
                    distance=qe.Distance.Dot,  # Dot keeps stored values as given (Cosine would normalise them)
                    multivector_config=qe.MultiVectorConfig(comparator=qe.MultiVectorComparator.MaxSim),
                    datatype=qe.VectorStorageDatatype.Uint8 if spec.latent_dtype == "uint8" else qe.VectorStorageDatatype.Float16,
                    hnsw_config=qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10000),
                    memory=qe.Memory.Cold if spec.latents_on_disk else None,  # memory-mapped, read for the hits only
                ),
            })
            self.shard = qe.EdgeShard.create(str(self.dir), config)
            for name in INDEXED_FIELDS:
                self.shard.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Keyword))
            self.shard.flush()
        tmp = self.dir / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(spec), indent=2))
        tmp.rename(self.dir / META_FILE)

    def read_spec(self):
        path = self.dir / META_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # truncated, not JSON, not UTF-8, unreadable
            return CollectionSpec.from_stored(None, f"{path} ({type(exc).__name__}: {exc})")  # raises
        return CollectionSpec.from_stored(data, str(path))

    def stray_points(self) -> int:
        return self.count() if self.shard is not None else 0

    def upsert(self, passages) -> None:
        qe = self.qe
        points = [
            qe.Point(p.id, {DENSE: np.asarray(p.dense, dtype=np.float32), LATENT: _latents_to_rows(p.latents)}, p.payload)
            for p in passages
        ]
        self._engine("write points", self.shard.update, qe.UpdateOperation.upsert_points(points))
        self._engine("write points", self.shard.flush)  # a batch is durable once upsert returns

    def search(self, vector, limit, with_latents):
        qe = self.qe
        hits = self._engine("search", self.shard.search, qe.SearchRequest(
            query=qe.Query.Nearest(np.asarray(vector, dtype=np.float32), using=DENSE), limit=limit,
            with_payload=True, with_vector=[LATENT] if with_latents else False,
        ))
        return [_to_passage(h, with_latents, score=float(h.score)) for h in hits]

    def retrieve(self, ids, with_latents):
        recs = self._engine("read points", self.shard.retrieve, list(ids), True, [LATENT] if with_latents else None)
        return [_to_passage(r, with_latents) for r in recs]

    def scroll_doc_ids(self, doc_id=None) -> Iterable:
        qe = self.qe
        flt = qe.Filter(must=[qe.FieldCondition(key="doc_id", match=qe.MatchValue(value=doc_id))]) if doc_id is not None else None
        offset = None
        while True:
            batch, offset = self._engine("list points", self.shard.scroll, qe.ScrollRequest(
                limit=512, offset=offset, filter=flt, with_payload=["doc_id"], with_vector=False))
            yield from batch
            if offset is None:
                return

    def delete(self, ids) -> None:
        if ids:
            self._engine("delete points", self.shard.update, self.qe.UpdateOperation.delete_points(list(ids)))
            self._engine("delete points", self.shard.flush)

    def count(self) -> int:
        return self._engine("count points", self.shard.count, self.qe.CountRequest(exact=True))

    def disk_bytes(self) -> int:
        return directory_bytes(self.dir)

    def flush(self) -> None:
        if self.shard is not None:
            self.shard.flush()

    def optimize(self) -> None:
        if self.shard is not None:
            self.shard.optimize()  # the embedded engine runs no background optimizer
            return_freed_heap()

    def close(self) -> None:
        if self.shard is not None:
            self.shard.flush()
            self.shard.close()
            self.shard = None
        self._release()
