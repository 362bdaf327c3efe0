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

    def scroll_doc_ids(self, doc_id=None) -> Iterable:
        qe = self.qe
        flt = qe.Filter(must=[qe.FieldCondition(key="doc_id", match=qe.MatchValue(value=doc_id))]) if doc_id is not None else None
        offset = None
        while True:
            batch, offset = self.shard.scroll(qe.ScrollRequest(limit=512, offset=offset, filter=flt, with_payload=["doc_id"], with_vector=False))
            yield from batch
            if offset is None:
                return

    def delete(self, ids) -> None:
        if ids:
            self.shard.update(self.qe.UpdateOperation.delete_points(list(ids)))
            self.shard.flush()

    def count(self) -> int:
        return self.shard.count(self.qe.CountRequest(exact=True))

    def disk_bytes(self) -> int:
        return directory_bytes(self.dir)

    def flush(self) -> None:
        if self.shard is not None:
            self.shard.flush()

    def close(self) -> None:
        if self.shard is not None:
            self.shard.flush()
            self.shard.close()
            self.shard = None
