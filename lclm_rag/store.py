"""The latent store: one Qdrant point per passage, dense vector + latents on the same point.

Point schema
    vector ``dense``   sentence-transformers embedding, cosine, HNSW-indexed (search)
    vector ``latent``  the passage's latents, a multivector: float16, MAX_SIM, HNSW off (m=0):
                       stored, never indexed; read back with the search hits (one round trip)
    payload            text, doc_id, source, chunk_index, start_char, end_char, num_tokens,
                       content_hash, fingerprint, ratio (+ the document's own metadata)

A collection records its compressor (fingerprint, ratio, latent width) and embedding model;
opening it with another compressor fails with a message naming both.

Backends behind one small facade (``LatentStore``), as qdrant-client does for its own:
    ``edge``          the Qdrant engine in-process (qdrant-edge-py): the embedded default
    ``qdrant``        qdrant-client: a server/cluster URL, ``:memory:`` or a local path
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lclm_rag.errors import CompressorMismatchError, InputError, StoreError
from lclm_rag.hub import lclm_home

logger = logging.getLogger(__name__)

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

    def check(self, stored: "CollectionSpec", collection: str) -> None:
        if stored.fingerprint != self.fingerprint or stored.ratio != self.ratio or stored.latent_dim != self.latent_dim:
            raise CompressorMismatchError(
                f"collection {collection!r} holds latents of compressor {stored.fingerprint} (ratio {stored.ratio}, "
                f"width {stored.latent_dim}); this compressor is {self.fingerprint} (ratio {self.ratio}, width "
                f"{self.latent_dim}). Use the collection's compressor, or ingest into a new collection."
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
    latents: torch.Tensor | None = None  # (n, latent_dim) float32 (stored as float16)
    score: float | None = None


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


# --------------------------------------------------------------------------- backends
class Backend:
    """What a storage engine must do. Ids are UUID strings; filters are on doc_id only."""

    def exists(self) -> bool: ...
    def create(self, spec: CollectionSpec, shard_number: int | None, replication_factor: int | None) -> None: ...
    def read_spec(self) -> CollectionSpec | None: ...
    def upsert(self, passages: Sequence[StoredPassage]) -> None: ...
    def search(self, vector: np.ndarray, limit: int, with_latents: bool) -> list[StoredPassage]: ...
    def retrieve(self, ids: Sequence[str], with_latents: bool) -> list[StoredPassage]: ...
    def ids_of_doc(self, doc_id: str) -> set[str]: ...
    def doc_ids(self) -> set[str]: ...
    def delete(self, ids: Sequence[str]) -> None: ...
    def count(self) -> int: ...
    def disk_bytes(self) -> int | None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class EdgeBackend(Backend):
    """Qdrant's engine in-process (qdrant-edge-py): float16 stored as float16, WAL-protected."""

    def __init__(self, directory: Path) -> None:
        import qdrant_edge as qe

        self.qe = qe
        self.dir = directory
        self.shard = None
        if (directory / "edge_config.json").exists():
            try:
                self.shard = qe.EdgeShard.load(str(directory))
            except Exception as exc:  # the engine raises plain Exception
                if "WouldBlock" in str(exc):
                    raise StoreError(
                        f"the embedded collection at {directory} is open in another process: the in-process engine "
                        "allows one process at a time (use a Qdrant server, --qdrant-url, for concurrent workers)"
                    ) from exc
                raise StoreError(f"cannot open the embedded collection at {directory}: {exc}") from exc

    def exists(self) -> bool:
        return self.shard is not None and (self.dir / META_FILE).exists()

    def create(self, spec, shard_number=None, replication_factor=None) -> None:
        qe = self.qe
        if self.shard is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            config = qe.EdgeConfig(vectors={
                DENSE: qe.EdgeVectorParams(size=spec.embedding_dim, distance=qe.Distance.Cosine),
                LATENT: qe.EdgeVectorParams(
                    size=spec.latent_dim,
                    distance=qe.Distance.Dot,  # Dot keeps stored values as given (Cosine would normalise them)
                    multivector_config=qe.MultiVectorConfig(comparator=qe.MultiVectorComparator.MaxSim),
                    datatype=qe.VectorStorageDatatype.Float16,
                    hnsw_config=qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10000),
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
        return CollectionSpec(**json.loads(path.read_text())) if path.exists() else None

    def upsert(self, passages) -> None:
        qe = self.qe
        points = [
            qe.Point(p.id, {DENSE: np.asarray(p.dense, dtype=np.float32), LATENT: _latents_to_rows(p.latents)}, p.payload)
            for p in passages
        ]
        self.shard.update(qe.UpdateOperation.upsert_points(points))
        self.shard.flush()  # a batch is durable once upsert returns

    def search(self, vector, limit, with_latents):
        qe = self.qe
        hits = self.shard.search(qe.SearchRequest(
            query=qe.Query.Nearest(np.asarray(vector, dtype=np.float32), using=DENSE), limit=limit,
            with_payload=True, with_vector=[LATENT] if with_latents else False,
        ))
        return [_to_passage(h, with_latents, score=float(h.score)) for h in hits]

    def retrieve(self, ids, with_latents):
        recs = self.shard.retrieve(list(ids), True, [LATENT] if with_latents else None)
        return [_to_passage(r, with_latents) for r in recs]

    def _scroll(self, flt=None) -> Iterable:
        qe = self.qe
        offset = None
        while True:
            batch, offset = self.shard.scroll(qe.ScrollRequest(limit=512, offset=offset, filter=flt, with_payload=["doc_id"], with_vector=False))
            yield from batch
            if offset is None:
                return

    def ids_of_doc(self, doc_id):
        qe = self.qe
        flt = qe.Filter(must=[qe.FieldCondition(key="doc_id", match=qe.MatchValue(value=doc_id))])
        return {str(r.id) for r in self._scroll(flt)}

    def doc_ids(self):
        return {r.payload["doc_id"] for r in self._scroll() if r.payload and "doc_id" in r.payload}

    def delete(self, ids) -> None:
        if ids:
            self.shard.update(self.qe.UpdateOperation.delete_points(list(ids)))
            self.shard.flush()

    def count(self) -> int:
        return self.shard.count(self.qe.CountRequest(exact=True))

    def disk_bytes(self) -> int:
        # allocated blocks, not apparent size: the engine pre-allocates sparse files
        return sum(p.stat().st_blocks * 512 for p in self.dir.rglob("*") if p.is_file())

    def flush(self) -> None:
        if self.shard is not None:
            self.shard.flush()

    def close(self) -> None:
        if self.shard is not None:
            self.shard.flush()
            self.shard.close()
            self.shard = None


class QdrantClientBackend(Backend):
    """qdrant-client: a server or cluster (url), ``:memory:``, or a local path. Retries transient errors."""

    def __init__(self, name: str, url: str | None = None, path: str | None = None, api_key: str | None = None,
                 prefer_grpc: bool = True, timeout: int = 30, retries: int = 5, retry_wait: float = 0.5) -> None:
        from qdrant_client import QdrantClient

        self.name = name
        self.location = url or path or ":memory:"
        if url:
            self.client = QdrantClient(url=url, api_key=api_key, prefer_grpc=prefer_grpc, timeout=timeout, check_compatibility=False)
        elif path and path != ":memory:":
            self.client = QdrantClient(path=path)
        else:
            self.client = QdrantClient(location=":memory:")
        self._path = path if path and path != ":memory:" else None
        self._remote = bool(url)
        self._retrying = _retrying(retries, retry_wait, self.location)

    def _call(self, fn, *args, **kwargs):
        return self._retrying(fn, *args, **kwargs)

    def exists(self):
        return self._call(self.client.collection_exists, self.name)

    def create(self, spec, shard_number=None, replication_factor=None):
        from qdrant_client import models as m

        if not self.exists():
            self._call(
                self.client.create_collection,
                self.name,
                vectors_config={
                    DENSE: m.VectorParams(size=spec.embedding_dim, distance=m.Distance.COSINE),
                    LATENT: m.VectorParams(
                        size=spec.latent_dim, distance=m.Distance.DOT, datatype=m.Datatype.FLOAT16,
                        multivector_config=m.MultiVectorConfig(comparator=m.MultiVectorComparator.MAX_SIM),
                        hnsw_config=m.HnswConfigDiff(m=0),
                    ),
                },
                shard_number=shard_number,
                replication_factor=replication_factor,
                metadata={"lclm_rag": asdict(spec)},
            )
            if self._remote:  # local mode ignores payload indexes (and warns)
                for name in INDEXED_FIELDS:
                    self._call(self.client.create_payload_index, self.name, name, m.PayloadSchemaType.KEYWORD)
        else:
            self._call(self.client.update_collection, self.name, metadata={"lclm_rag": asdict(spec)})

    def read_spec(self):
        info = self._call(self.client.get_collection, self.name)
        meta = (info.config.metadata or {}).get("lclm_rag")
        return CollectionSpec(**meta) if meta else None

    def upsert(self, passages):
        from qdrant_client import models as m

        points = [
            m.PointStruct(id=p.id, vector={DENSE: np.asarray(p.dense, dtype=np.float32).tolist(), LATENT: _latents_to_rows(p.latents).tolist()}, payload=p.payload)
            for p in passages
        ]
        self._call(self.client.upsert, self.name, points=points, wait=True)

    def search(self, vector, limit, with_latents):
        res = self._call(
            self.client.query_points, self.name, query=np.asarray(vector, dtype=np.float32).tolist(), using=DENSE,
            limit=limit, with_payload=True, with_vectors=[LATENT] if with_latents else False,
        )
        return [_to_passage(p, with_latents, score=float(p.score)) for p in res.points]

    def retrieve(self, ids, with_latents):
        recs = self._call(self.client.retrieve, self.name, ids=list(ids), with_payload=True, with_vectors=[LATENT] if with_latents else False)
        return [_to_passage(r, with_latents) for r in recs]

    def _scroll(self, flt=None):
        offset = None
        while True:
            batch, offset = self._call(self.client.scroll, self.name, scroll_filter=flt, limit=512, offset=offset, with_payload=["doc_id"], with_vectors=False)
            yield from batch
            if offset is None:
                return

    def ids_of_doc(self, doc_id):
        from qdrant_client import models as m

        flt = m.Filter(must=[m.FieldCondition(key="doc_id", match=m.MatchValue(value=doc_id))])
        return {str(r.id) for r in self._scroll(flt)}

    def doc_ids(self):
        return {r.payload["doc_id"] for r in self._scroll() if r.payload and "doc_id" in r.payload}

    def delete(self, ids):
        from qdrant_client import models as m

        if ids:
            self._call(self.client.delete, self.name, points_selector=m.PointIdsList(points=list(ids)), wait=True)

    def count(self):
        return self._call(self.client.count, self.name, exact=True).count

    def disk_bytes(self):
        if not self._path:
            return None
        return sum(p.stat().st_blocks * 512 for p in Path(self._path).rglob("*") if p.is_file())

    def flush(self):
        pass

    def close(self):
        self.client.close()


def _retrying(attempts: int, wait: float, location: str):
    """tenacity policy: retry connection errors, timeouts and 5xx, then fail naming the server."""
    import httpx
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

    def transient(exc: BaseException) -> bool:
        if isinstance(exc, UnexpectedResponse):
            return exc.status_code is None or exc.status_code >= 500 or exc.status_code == 429
        if isinstance(exc, (ResponseHandlingException, httpx.TransportError, ConnectionError, TimeoutError)):
            return True
        try:
            import grpc

            return isinstance(exc, grpc.RpcError) and exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        except ImportError:
            return False

    def call(fn, *args, **kwargs):
        retrying = Retrying(
            stop=stop_after_attempt(attempts), wait=wait_exponential(multiplier=wait, max=10),
            retry=retry_if_exception(transient), reraise=True,
        )
        try:
            return retrying(fn, *args, **kwargs)
        except Exception as exc:
            if transient(exc):
                raise StoreError(f"Qdrant at {location} did not answer after {attempts} attempts: {type(exc).__name__}: {exc}") from exc
            raise

    return call


# --------------------------------------------------------------------------- facade
class LatentStore:
    """One collection of passages with latents, on any backend.

    ``LatentStore.open(name)``: the embedded default under ``$LCLM_RAG_HOME/collections``;
    ``path=``: an embedded collection in that directory; ``url=``: a Qdrant server/cluster;
    ``location=":memory:"``: qdrant-client in memory (tests); ``backend="qdrant", path=``: qdrant-client local mode.
    """

    def __init__(self, name: str, backend: Backend) -> None:
        self.name = name
        self.backend = backend
        self.spec: CollectionSpec | None = backend.read_spec() if backend.exists() else None

    @classmethod
    def open(cls, name: str, *, path: str | Path | None = None, url: str | None = None, api_key: str | None = None,
             location: str | None = None, backend: str = "auto", **client_kwargs) -> "LatentStore":
        if not isinstance(name, str) or not name.strip() or "/" in name:
            raise InputError(f"collection name must be a non-empty string without '/', got {name!r}")
        if backend not in ("auto", "edge", "qdrant"):
            raise InputError(f"backend must be 'auto', 'edge' or 'qdrant', got {backend!r}")
        if url or location == ":memory:" or backend == "qdrant":
            return cls(name, QdrantClientBackend(name, url=url, path=str(path) if path else location, api_key=api_key, **client_kwargs))
        directory = Path(path) if path else lclm_home() / "collections" / name
        return cls(name, EdgeBackend(directory))

    # -- compressor binding
    def bind(self, spec: CollectionSpec, shard_number: int | None = None, replication_factor: int | None = None) -> None:
        """Create the collection for ``spec`` or check that it already holds the same compressor's latents."""
        stored = self.backend.read_spec() if self.backend.exists() else None
        if stored is not None:
            spec.check(stored, self.name)
        else:
            self.backend.create(spec, shard_number, replication_factor)
        self.spec = spec

    def require(self, fingerprint: str | None = None) -> CollectionSpec:
        """The collection's spec; raises if it does not exist or belongs to another compressor."""
        if self.spec is None:
            raise StoreError(f"collection {self.name!r} does not exist (ingest into it first: lclm-rag ingest PATH --collection {self.name})")
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
            self.backend.upsert(passages)

    def search(self, vector: np.ndarray, top_k: int, with_latents: bool = True) -> list[StoredPassage]:
        self.require()
        if top_k <= 0:
            raise InputError(f"top_k must be positive, got {top_k}")
        return self.backend.search(vector, top_k, with_latents)

    def retrieve(self, ids: Sequence[str], with_latents: bool = True) -> list[StoredPassage]:
        self.require()
        return self.backend.retrieve(ids, with_latents) if ids else []

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

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "LatentStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
