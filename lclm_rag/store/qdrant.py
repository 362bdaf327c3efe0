"""qdrant-client: a Qdrant server or cluster (gRPC, retries with backoff), ``:memory:`` or a local path."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from lclm_rag.errors import StoreError
from lclm_rag.store.base import DENSE, INDEXED_FIELDS, LATENT, Backend, CollectionSpec, _latents_to_rows, _to_passage, directory_bytes


class QdrantClientBackend(Backend):
    """qdrant-client: a server or cluster (url), ``:memory:``, or a local path. Retries transient errors."""

    def __init__(self, name: str, url: str | None = None, path: str | None = None, api_key: str | None = None,
                 prefer_grpc: bool = True, timeout: int = 30, retries: int = 5, retry_wait: float = 0.5) -> None:
        from qdrant_client import QdrantClient

        self.name = name
        self.location = url or path or ":memory:"
        if url:
            from urllib.parse import urlsplit

            port = urlsplit(url if "//" in url else f"http://{url}").port
            grpc = {"prefer_grpc": prefer_grpc}
            if port == 6334:  # the gRPC port itself
                grpc["grpc_port"] = port
            elif port not in (None, 6333):  # a custom port is the REST port: dial it, not gRPC's default 6334
                grpc["prefer_grpc"] = False
            self.client = QdrantClient(url=url, api_key=api_key, timeout=timeout, check_compatibility=False, **grpc)
            self.location = f"{url} ({'gRPC' if grpc['prefer_grpc'] else 'REST'})"
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
                        size=spec.latent_dim, distance=m.Distance.DOT,
                        datatype=m.Datatype.UINT8 if spec.latent_dtype == "uint8" else m.Datatype.FLOAT16,
                        multivector_config=m.MultiVectorConfig(comparator=m.MultiVectorComparator.MAX_SIM),
                        hnsw_config=m.HnswConfigDiff(m=0),
                        on_disk=True if spec.latents_on_disk else None,  # memory-mapped, read for the hits only
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
        return CollectionSpec.from_stored(meta, f"collection {self.name!r} at {self.location} (metadata 'lclm_rag')") if meta is not None else None

    def stray_points(self):
        return self.count() if self.exists() else 0

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

    def scroll_doc_ids(self, doc_id=None):
        from qdrant_client import models as m

        flt = m.Filter(must=[m.FieldCondition(key="doc_id", match=m.MatchValue(value=doc_id))]) if doc_id is not None else None
        offset = None
        while True:
            batch, offset = self._call(self.client.scroll, self.name, scroll_filter=flt, limit=512, offset=offset, with_payload=["doc_id"], with_vectors=False)
            yield from batch
            if offset is None:
                return

    def delete(self, ids):
        from qdrant_client import models as m

        if ids:
            self._call(self.client.delete, self.name, points_selector=m.PointIdsList(points=list(ids)), wait=True)

    def count(self):
        return self._call(self.client.count, self.name, exact=True).count

    def disk_bytes(self):
        if not self._path:
            return None
        return directory_bytes(self._path)

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
