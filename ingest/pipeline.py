"""Ingestion: files or LlamaIndex nodes -> chunks -> (embedding, latents) -> one Qdrant point each.

Safe to re-run: point ids are deterministic (document id + chunk index + content hash), so an
unchanged chunk is found and skipped, a changed document gets its new chunks written first and
its old ones deleted after, and a run killed at any point converges to every passage stored
exactly once when run again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lclm_rag.ingest.reading import (
    RECORD_EXTENSIONS,
    TEXT_EXTENSIONS,
    SourceDocument,
    clean_text,
    doc_key,
    iter_files,
    legacy_doc_key,
    read_file,
    unstorable,
)

from lclm_rag.chunking import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP, Chunk, check_chunking, chunk_text
from lclm_rag.compressor import LatentCompressor
from lclm_rag.embedding import Embedder
from lclm_rag.errors import ConfigError, InputError
from lclm_rag.sidecar import key_terms
from lclm_rag.store import CollectionSpec, LatentStore, StoredPassage, content_hash, id_for_node, point_id
from lclm_rag.store.base import USER_FIELDS, with_user_fields

__all__ = ["TEXT_EXTENSIONS", "FailedSource", "IngestPlan", "IngestReport", "Ingestor", "SourceDocument", "clean_text",
           "in_shard", "read_file"]

logger = logging.getLogger(__name__)

PASSAGES_PER_SECOND_CPU = 15  # measured ingestion speed on 2 CPU cores (docs/benchmarks.md), for the estimate


@dataclass
class FailedSource:
    source: str
    reason: str
    doc_ids: list[str] = field(default_factory=list)  # documents whose stored chunks must stay untouched
    prefixes: list[str] = field(default_factory=list)  # and those whose ids start so (a record file's, a directory's)

    def protects(self, doc_id: str) -> bool:
        """Whether ``--prune`` must keep this stored document: ids compared whole, never cut at '#'
        (a file may be named ``notes#2024.jsonl``)."""
        return doc_id in self.doc_ids or doc_id.startswith(tuple(self.prefixes))

    @classmethod
    def of_file(cls, path: Path, reason: str) -> "FailedSource":
        """A file that could not be read: its own document, and a record file's records, are kept."""
        keys = list(dict.fromkeys((doc_key(path), legacy_doc_key(path))))
        records = [k + "#" for k in keys] if path.suffix.lower() in RECORD_EXTENSIONS else []
        return cls(str(path), reason, keys, records)


@dataclass
class IngestReport:
    files: int = 0
    documents: int = 0
    passages: int = 0  # chunks in the input
    written: int = 0  # points written by this run
    skipped: int = 0  # unchanged chunks already stored
    deleted: int = 0  # stale chunks of changed documents
    pruned: int = 0  # chunks of documents no longer in the input (--prune)
    failed: list[FailedSource] = field(default_factory=list)
    renamed: dict[str, set[str]] = field(default_factory=dict)  # source -> its fields kept under user_fields
    bytes_stored: int | None = None
    seconds: float = 0.0

    def messages(self) -> list[str]:
        """What a user must see besides the summary: fields kept under ``user_fields``, then failed sources."""
        return ([f"note: {source}: fields named like the system's are stored under 'user_fields': {', '.join(sorted(names))}"
                 for source, names in self.renamed.items()] + [f"failed: {f.source}: {f.reason}" for f in self.failed])

    def summary(self) -> str:
        size = "n/a" if self.bytes_stored is None else f"{self.bytes_stored / 1e6:.1f} MB"
        return (
            f"files {self.files}, documents {self.documents}, passages {self.passages} "
            f"(written {self.written}, unchanged {self.skipped}, stale deleted {self.deleted}, pruned {self.pruned}), "
            f"failed {len(self.failed)}, stored {size}, {self.seconds:.1f} s"
        )


def in_shard(doc_id: str, shard: tuple[int, int] | None) -> bool:
    """Stable split of documents across workers (``--shard i/n``)."""
    if shard is None:
        return True
    index, count = shard
    return zlib.crc32(doc_id.encode()) % count == index


class Ingestor:
    """Chunks, embeds, compresses and upserts into a LatentStore bound to this compressor."""

    def __init__(self, store: LatentStore, compressor: LatentCompressor, embedder: Embedder,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS, overlap: int = DEFAULT_OVERLAP, batch_size: int = 32,
                 shard_number: int | None = None, replication_factor: int | None = None, latent_dtype: str | None = None,
                 latents_on_disk: bool | None = None, encoder=None) -> None:
        """``encoder``: where embedding and compression run (None: here, batch by batch; a
        ``RayDataEncoder``: on a Ray cluster's actors); everything else is the same either way.
        ``latent_dtype``: how a new collection stores latents ("uint8", the default, or "float16");
        ``latents_on_disk``: whether a new collection keeps them on disk (memory-mapped, read for the
        hits only) instead of in RAM. None for an existing collection keeps its own; another value
        than it has is refused (both are chosen when the collection is created)."""
        check_chunking(chunk_tokens, overlap)  # before the collection is created: a mistake leaves nothing behind
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.store, self.compressor, self.embedder = store, compressor, embedder
        self.chunk_tokens, self.overlap, self.batch_size = chunk_tokens, overlap, batch_size
        self.encoder = encoder
        if latent_dtype is None:
            latent_dtype = store.latent_dtype_for_writes()
        if latents_on_disk is None:
            latents_on_disk = store.spec.latents_on_disk if store.spec is not None else False
        elif store.spec is not None and store.spec.latents_on_disk != latents_on_disk:
            where = "on disk" if store.spec.latents_on_disk else "in RAM"
            raise InputError(f"collection {store.name!r} keeps its latents {where}; that is chosen when a collection is "
                             "created (ingest into a new collection to change it)")
        self.spec = CollectionSpec(
            fingerprint=compressor.fingerprint(), ratio=compressor.config.ratio,
            latent_dim=compressor.config.encoder_hidden_size, embedding_model=embedder.name, embedding_dim=embedder.dim,
            latent_dtype=latent_dtype, latents_on_disk=latents_on_disk,
        )
        store.bind(self.spec, shard_number=shard_number, replication_factor=replication_factor)

    # ---------------------------------------------------------------- entry points
    def ingest_paths(self, paths: Sequence[str | Path], *, prune: bool = False, strict: bool = False,
                     shard: tuple[int, int] | None = None, text_field: str = "text", progress: bool = True) -> IngestReport:
        report = IngestReport()
        start = time.perf_counter()
        docs: list[SourceDocument] = []
        seen: dict[str, str] = {}  # document id -> the file it was first read from
        unreadable: list[tuple[Path, str]] = []
        repeated: list[tuple[Path, str]] = []

        def fail(failure: FailedSource) -> None:
            report.failed.append(failure)
            logger.info("skipped %s: %s", failure.source, failure.reason)
            if strict:
                raise InputError(f"{failure.source}: {failure.reason}")

        adopt = self.store.count() > 0  # only a collection that holds documents can hold earlier ids
        for path in iter_files(paths, unreadable, repeated):
            report.files += 1
            try:
                file_docs = read_file(path, text_field)
                problem = next(filter(None, map(unstorable, file_docs)), None)
                if problem:
                    raise InputError(problem)
            except Exception as exc:  # whatever one file does (OSError, RecursionError, a reader's own), it fails alone
                fail(FailedSource.of_file(path, str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"))
                continue
            fresh, repeats = [], []
            for d in file_docs:  # a document id read twice (a link to a sibling, a path given twice, ids 1 and "1"): the first wins
                (repeats if d.doc_id in seen else fresh).append(d)
                seen.setdefault(d.doc_id, str(path))
            if repeats:
                more = f" (and {len(repeats) - 1} more)" if len(repeats) > 1 else ""
                fail(FailedSource(str(path), f"duplicate document id {repeats[0].doc_id!r}{more}: the one first read, from "
                                             f"{seen[repeats[0].doc_id]}, is kept"))
            docs.extend(self._adopt_stored_ids(path, d) if adopt else d for d in fresh if in_shard(d.doc_id, shard))
        for directory, reason in unreadable:
            fail(FailedSource(str(directory), f"unreadable directory: {reason}",
                              prefixes=[doc_key(directory) + "/", legacy_doc_key(directory) + "/"]))
        for link, reason in repeated:  # its files were read by their other path
            fail(FailedSource(str(link), reason))
        self._ingest(docs, report, progress)
        if prune:
            keep = {d.doc_id for d in docs}
            for doc_id in self.store.doc_ids():
                if doc_id in keep or not in_shard(doc_id, shard) or any(f.protects(doc_id) for f in report.failed):
                    continue
                stale = self.store.ids_of_doc(doc_id)
                self.store.delete(stale)
                report.pruned += len(stale)
        report.bytes_stored = self.store.disk_bytes()
        report.seconds = time.perf_counter() - start
        return report

    def _adopt_stored_ids(self, path: Path, doc: SourceDocument) -> SourceDocument:
        """A document stored under its working-directory-relative id (collections written before
        ids were absolute) keeps that id, so re-ingesting it neither duplicates nor rewrites it."""
        legacy = doc.doc_id.replace(doc_key(path), legacy_doc_key(path), 1)
        if legacy != doc.doc_id and not self.store.ids_of_doc(doc.doc_id) and self.store.ids_of_doc(legacy):
            return dataclasses.replace(doc, doc_id=legacy)
        return doc

    def ingest_documents(self, nodes: Sequence, split: bool = True, progress: bool = False) -> IngestReport:
        """Ingest LlamaIndex ``Document``/``TextNode`` objects.

        ``split=True``: each node is a document (id ``ref_doc_id`` or ``id_``), chunked here.
        ``split=False``: each node is already a chunk and becomes one point whose id is derived
        from the node id, so a ``LatentContextPostprocessor`` finds its latents by node id.
        """
        docs = []
        for node in nodes:
            text = node.get_content() if hasattr(node, "get_content") else None
            if not isinstance(text, str):
                raise InputError(f"{type(node).__name__} has no text content")
            doc_id = (getattr(node, "ref_doc_id", None) if split else None) or node.id_
            meta = {k: v for k, v in (node.metadata or {}).items() if isinstance(v, (str, int, float, bool))}
            docs.append(SourceDocument(str(doc_id), text, meta.get("file_path", "llama_index"), meta, node_id=None if split else node.id_))
        return self.ingest_sources(docs, progress=progress)

    def ingest_sources(self, docs: Sequence[SourceDocument], progress: bool = False) -> IngestReport:
        """Ingest documents already read (no LlamaIndex objects needed); one the store cannot hold is
        refused before anything is written."""
        for doc in docs:
            if problem := unstorable(doc):
                raise InputError(problem)
        report = IngestReport()
        start = time.perf_counter()
        self._ingest(list(docs), report, progress)
        report.seconds = time.perf_counter() - start
        return report

    # ---------------------------------------------------------------- the work
    def _ingest(self, docs: list[SourceDocument], report: IngestReport, progress: bool) -> None:
        plan = self.plan(docs, report)
        bar = None
        if progress and plan.pending:
            from tqdm import tqdm

            bar = tqdm(total=len(plan.pending), unit="passage", desc=f"ingest -> {self.store.name}")
        batches = (self.encoder.encode(plan.pending, self.compressor, self.embedder) if self.encoder is not None
                   else self._encoded_batches(plan.pending))
        for batch in batches:
            self.store.upsert(batch)
            report.written += len(batch)
            logger.info("upserted batch of %d (%d written)", len(batch), report.written)
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        self.retire(plan, report)

    def plan(self, docs: Sequence[SourceDocument], report: IngestReport) -> "IngestPlan":
        """Chunk every document and compare with the collection: the passages to write (text and
        payload, no vectors yet) and, per document, the stored chunks its new version replaces."""
        tok = self.compressor.tokenizer
        sidecar = self.compressor.config.sidecar_terms
        plan = IngestPlan()
        seen: set[str] = set()
        for doc in docs:
            if doc.doc_id in seen:
                raise InputError(f"document id {doc.doc_id!r} appears twice in the input")
            seen.add(doc.doc_id)
            report.documents += 1
            if doc.node_id is not None:
                n_tokens = len(tok(doc.text, add_special_tokens=False)["input_ids"])
                chunks = [Chunk(doc.text, 0, 0, len(doc.text), n_tokens)] if doc.text.strip() else []
            else:
                chunks = chunk_text(doc.text, tok, self.chunk_tokens, self.overlap)
            new, renamed = {}, False
            for c in chunks:
                digest = content_hash(c.text)
                pid = id_for_node(doc.node_id) if doc.node_id is not None else point_id(doc.doc_id, c.index, digest)
                system = {"doc_id": doc.doc_id, "source": doc.source, "chunk_index": c.index, "start_char": c.start_char,
                          "end_char": c.end_char, "num_tokens": c.num_tokens, "content_hash": digest}
                if sidecar:  # the exact strings the decoder reads after the passage's latents
                    system["key_terms"] = key_terms(c.text, sidecar)
                payload, moved = with_user_fields(system, doc.metadata)
                if moved:
                    report.renamed.setdefault(doc.source, set()).update(moved)
                    renamed = True
                new[pid] = StoredPassage(pid, c.text, payload)
            existing = self.store.ids_of_doc(doc.doc_id)
            if doc.node_id is not None and existing & new.keys():  # same node id, maybe new text
                for old in self.store.retrieve(list(existing & new.keys()), with_latents=False):
                    if old.payload.get("content_hash") != new[old.id].payload["content_hash"]:
                        existing = existing - {old.id}
            if renamed and existing & new.keys():  # written when the document's fields replaced the system's: rewrite
                for old in self.store.retrieve(list(existing & new.keys()), with_latents=False):
                    if old.payload.get(USER_FIELDS) != new[old.id].payload[USER_FIELDS]:
                        existing = existing - {old.id}
            report.passages += len(new)
            report.skipped += len(existing & new.keys())
            plan.pending.extend(p for pid, p in new.items() if pid not in existing)
            plan.stale_by_doc[doc.doc_id] = existing - new.keys()
        writing = {p.id for p in plan.pending}
        for doc_id, stale in plan.stale_by_doc.items():  # a point this run rewrites is never retired with it (a point
            plan.stale_by_doc[doc_id] = stale - writing  # an older release stored under another document's id)
        estimate = len(plan.pending) / PASSAGES_PER_SECOND_CPU
        if estimate > 3600:
            logger.warning("%s passages to compress: about %.1f h on a CPU (%d passages/s; a GPU is much faster)",
                           f"{len(plan.pending):,}", estimate / 3600, PASSAGES_PER_SECOND_CPU)
        return plan

    def _encoded_batches(self, pending: list[StoredPassage]) -> Iterator[list[StoredPassage]]:
        """Embed and compress in this process, batch by batch (a written batch's texts are released)."""
        while pending:
            batch, pending[: self.batch_size] = pending[: self.batch_size], []
            texts = [p.text for p in batch]
            vectors = self.embedder.embed(texts)
            latents = self.compressor.compress(texts, batch_size=self.batch_size)
            for p, v, lat in zip(batch, vectors, latents):
                p.dense, p.latents = v, lat
            yield batch

    def retire(self, plan: "IngestPlan", report: IngestReport) -> None:
        """Delete the chunks that changed documents no longer have: only once every new chunk is
        stored, so a run stopped midway loses nothing."""
        for stale in plan.stale_by_doc.values():
            self.store.delete(stale)
            report.deleted += len(stale)


@dataclass
class IngestPlan:
    """What a run has to do: passages to embed, compress and write; stored chunks to retire after."""

    pending: list[StoredPassage] = field(default_factory=list)
    stale_by_doc: dict[str, set[str]] = field(default_factory=dict)
