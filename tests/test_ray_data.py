"""Ingestion with embedding and compression on Ray Data: the same collection as the in-process path,
point for point, on every store backend; a worker killed mid-run changes nothing."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import open_test_store

from lclm_rag.errors import InputError

ray = pytest.importorskip("ray", reason="needs lclm-rag[ray]")
pytestmark = pytest.mark.xdist_group("ray")  # one local Ray cluster, in one test worker

from lclm_rag.ingest import Ingestor, SourceDocument  # noqa: E402
from lclm_rag.ingest.ray_data import RayDataEncoder  # noqa: E402


@pytest.fixture(scope="module")
def ray_encoder():
    """A local Ray cluster of 2 CPU workers, started once for the module."""
    encoder = RayDataEncoder(workers=2, batch_size=16)
    yield encoder
    encoder.close()


@pytest.fixture(scope="module")
def wiki_documents(shared_data) -> list[SourceDocument]:
    with open(shared_data / "corpus" / "wiki_summaries.jsonl") as f:
        records = [json.loads(next(f)) for _ in range(120)]
    return [SourceDocument(f"wiki#{r['id']}", r["text"], "wiki_summaries.jsonl", {"title": r["title"]}) for r in records]


def _points(store) -> dict:
    ids = sorted(i for doc in store.doc_ids() for i in store.ids_of_doc(doc))
    return {p.id: p for p in store.retrieve(ids)}


def _assert_same_collection(a, b, embedder) -> None:
    pa, pb = _points(a), _points(b)
    assert pa and pa.keys() == pb.keys()
    for pid in pa:
        assert pa[pid].payload == pb[pid].payload
        torch.testing.assert_close(pa[pid].latents.float(), pb[pid].latents.float(), atol=2e-3, rtol=2e-3)
    query = embedder.embed(["Which river flows through the capital?"])[0]
    hits_a, hits_b = a.search(query, 10, with_latents=False), b.search(query, 10, with_latents=False)
    assert [h.id for h in hits_a] == [h.id for h in hits_b]
    np.testing.assert_allclose([h.score for h in hits_a], [h.score for h in hits_b], atol=1e-5)


class _KillAWorkerAfterFirstWrite(logging.Handler):
    """Once the first batch is written, SIGKILL one Ray Data actor process (the others keep going)."""

    def __init__(self) -> None:
        super().__init__()
        self.killed: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        import psutil

        if self.killed or not record.getMessage().startswith("upserted batch"):
            return
        for proc in psutil.process_iter(["cmdline"]):
            if "MapWorker" in " ".join(proc.info["cmdline"] or []):
                os.kill(proc.pid, signal.SIGKILL)
                self.killed.append(proc.pid)
                return


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["edge", "qdrant-path"])
def test_ray_ingest_equals_the_in_process_collection_and_survives_a_killed_worker(kind, tmp_path, ray_encoder, model,
                                                                                 embedder, wiki_documents):
    local = open_test_store("edge", tmp_path / "local")
    Ingestor(local, model.compressor, embedder, batch_size=16).ingest_sources(wiki_documents)

    store = open_test_store(kind, tmp_path)
    killer = _KillAWorkerAfterFirstWrite()
    log = logging.getLogger("lclm_rag.ingest.pipeline")
    log.addHandler(killer)
    previous = log.level
    log.setLevel(logging.INFO)
    try:
        report = Ingestor(store, model.compressor, embedder, batch_size=16, encoder=ray_encoder).ingest_sources(wiki_documents)
    finally:
        log.removeHandler(killer)
        log.setLevel(previous)
    assert killer.killed, "no Ray Data worker was found to kill"
    assert report.written == report.passages == store.count() > 16
    _assert_same_collection(store, local, embedder)

    again = Ingestor(store, model.compressor, embedder, batch_size=16, encoder=ray_encoder).ingest_sources(wiki_documents)
    assert (again.written, again.skipped, store.count()) == (0, report.passages, report.passages)
    store.close()
    local.close()


@pytest.mark.slow
def test_a_ray_run_finishes_what_an_in_process_run_left_and_replaces_changed_documents(tmp_path, ray_encoder, model, embedder,
                                                                                      wiki_documents):
    store = open_test_store("edge", tmp_path)
    Ingestor(store, model.compressor, embedder).ingest_sources(wiki_documents[:40])  # a run stopped part way
    changed = [SourceDocument(d.doc_id, d.text + " It was revised.", d.source, d.metadata) if i == 3 else d
               for i, d in enumerate(wiki_documents)]
    report = Ingestor(store, model.compressor, embedder, encoder=ray_encoder).ingest_sources(changed)
    assert report.skipped > 0 and report.deleted >= 1 and report.written == report.passages - report.skipped
    assert store.count() == report.passages

    reference = open_test_store("edge", tmp_path / "reference")
    Ingestor(reference, model.compressor, embedder).ingest_sources(changed)
    _assert_same_collection(store, reference, embedder)
    store.close()
    reference.close()


def test_bad_ray_settings_fail_with_one_line_errors():
    with pytest.raises(InputError, match="workers must be >= 1"):
        RayDataEncoder(workers=0)
    with pytest.raises(InputError, match="no Ray cluster answers at 127.0.0.1:9"):
        RayDataEncoder(address="127.0.0.1:9")
    with pytest.raises(InputError, match="must be 'auto', host:port"):
        RayDataEncoder(address="nowhere")


@pytest.mark.slow
def test_cli_ingest_on_ray_writes_the_collection_the_plain_cli_writes(tmp_path, capsys, tiny_checkpoint):
    from pathlib import Path

    from lclm_rag.cli import main

    docs = Path(__file__).resolve().parents[1] / "examples" / "docs"
    args = ["ingest", str(docs), "--collection", "ex", "--checkpoint", tiny_checkpoint, "--no-progress"]  # the CLI's wiring
    env = dict(os.environ)
    assert main([*args, "--path", str(tmp_path / "plain")]) == 0  # the plain CLI in this process: the reference
    assert "written 9" in capsys.readouterr().out
    on_ray = subprocess.run([sys.executable, "-m", "lclm_rag.cli", *args, "--path", str(tmp_path / "ray"), "--ray",
                             "--ray-workers", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert on_ray.returncode == 0, on_ray.stderr[-2000:]
    assert "written 9" in on_ray.stdout
    cli = [sys.executable, "-m", "lclm_rag.cli", *args]
    bad = subprocess.run([*cli, "--path", str(tmp_path / "bad"), "--ray-workers", "2"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--ray-workers needs --ray" in bad.stderr
    assert not (tmp_path / "bad").exists()

    from lclm_rag.embedding import Embedder
    from lclm_rag.store import LatentStore

    with LatentStore.open("ex", path=tmp_path / "plain") as a, LatentStore.open("ex", path=tmp_path / "ray") as b:
        _assert_same_collection(a, b, Embedder())
