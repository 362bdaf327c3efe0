import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BACKENDS, open_test_store
from lclm_rag.ingest import Ingestor

from lclm_rag.errors import InputError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DOCS = REPO / "examples" / "docs"
SHARED_WIKI = REPO.parent / "shared" / "data" / "corpus" / "wiki_summaries.jsonl"


@pytest.fixture()
def docs(tmp_path):
    target = tmp_path / "docs"
    shutil.copytree(EXAMPLE_DOCS, target)
    return target


def _stored(store):
    return {p.id: p for p in store.retrieve(list(_all_ids(store)), with_latents=False)}


def _all_ids(store):
    return {i for d in store.doc_ids() for i in store.ids_of_doc(d)}


@pytest.mark.parametrize("kind", BACKENDS)
def test_ingest_is_idempotent_and_tracks_changes(kind, tmp_path, docs, make_compressor, embedder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_test_store(kind, tmp_path)
    ingestor = Ingestor(store, make_compressor(ratio=4), embedder, chunk_tokens=64, overlap=8, batch_size=8)
    first = ingestor.ingest_paths([docs], progress=False)
    assert first.files == 4 and first.documents == 4 and not first.failed
    assert first.written == first.passages == store.count() > 4
    hit = store.search(embedder.embed(["Who designed the Eiffel Tower?"])[0], top_k=1)[0]
    assert hit.payload["doc_id"] == "docs/eiffel_tower.md" and hit.latents.shape[1] == 576
    assert {"source", "chunk_index", "start_char", "end_char", "num_tokens", "content_hash", "fingerprint", "ratio"} <= hit.payload.keys()

    again = ingestor.ingest_paths([docs], progress=False)
    assert again.written == 0 and again.skipped == first.passages and store.count() == first.passages

    # a changed document: new chunks in, old ones out, none left behind
    path = docs / "photosynthesis.txt"
    old_ids = store.ids_of_doc("docs/photosynthesis.txt")
    path.write_text("Photosynthesis happens in chloroplasts. " + path.read_text().replace("glucose", "sugar"))
    changed = ingestor.ingest_paths([docs], progress=False)
    new_ids = store.ids_of_doc("docs/photosynthesis.txt")
    assert changed.written == len(new_ids) and changed.deleted == len(old_ids) and not (old_ids & new_ids)
    stored_text = " ".join(p.text for p in store.retrieve(list(new_ids), with_latents=False))
    assert "sugar" in stored_text and "glucose" not in stored_text
    assert store.count() == first.passages - len(old_ids) + len(new_ids)

    # a deleted document is removed with prune
    (docs / "apollo_11.md").unlink()
    pruned = ingestor.ingest_paths([docs], prune=True, progress=False)
    assert pruned.pruned > 0 and "docs/apollo_11.md" not in store.doc_ids()
    store.close()


def test_bad_files_are_reported_and_stored_data_is_untouched(tmp_path, docs, make_compressor, embedder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_test_store("edge", tmp_path)
    ingestor = Ingestor(store, make_compressor(ratio=4), embedder, chunk_tokens=64, batch_size=8)
    ingestor.ingest_paths([docs], progress=False)
    before = store.count()
    reef_ids = store.ids_of_doc("docs/great_barrier_reef.txt")
    (docs / "great_barrier_reef.txt").write_bytes(b"\x89PNG\r\n\x00\x00 binary junk")  # now unreadable as text
    (docs / "empty.txt").write_text("   \n")
    (docs / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (docs / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    (docs / "dangling.md").symlink_to(tmp_path / "nowhere.md")
    report = ingestor.ingest_paths([docs], prune=True, progress=False)
    reasons = {Path(f.source).name: f.reason for f in report.failed}
    assert reasons.keys() == {"great_barrier_reef.txt", "empty.txt", "latin1.txt", "broken.jsonl", "dangling.md"}
    assert "binary" in reasons["great_barrier_reef.txt"] and "empty" in reasons["empty.txt"]
    assert "UTF-8" in reasons["latin1.txt"] and "JSONL" in reasons["broken.jsonl"]
    assert store.ids_of_doc("docs/great_barrier_reef.txt") == reef_ids  # failed file: its stored chunks stay
    assert store.count() == before
    with pytest.raises(InputError, match="broken.jsonl: invalid JSONL"):  # the first bad file, in path order
        ingestor.ingest_paths([docs], strict=True, progress=False)
    assert store.count() == before
    store.close()


def test_llama_index_documents(tmp_path, make_compressor, embedder):
    from llama_index.core import Document
    from llama_index.core.schema import TextNode

    store = open_test_store("qdrant-memory", tmp_path)
    ingestor = Ingestor(store, make_compressor(ratio=4), embedder, chunk_tokens=64)
    nodes = [Document(text="Mount Everest is 8,849 metres high.", id_="everest", metadata={"topic": "geo"}),
             TextNode(text="The Nile is a river in Africa.", id_="nile")]
    report = ingestor.ingest_documents(nodes)
    assert report.written == 2 and store.doc_ids() == {"everest", "nile"}
    hit = store.search(embedder.embed(["How high is Everest?"])[0], top_k=1)[0]
    assert hit.payload["topic"] == "geo" and hit.text.startswith("Mount Everest")
    with pytest.raises(InputError):
        ingestor.ingest_documents([object()])


def _cli(*args, **kw):
    return [sys.executable, "-m", "lclm_rag.cli", *args]


@pytest.mark.slow
@pytest.mark.usefixtures("shared_data")
def test_kill_9_then_rerun_stores_every_passage_exactly_once(tmp_path):
    corpus = tmp_path / "wiki.jsonl"
    with SHARED_WIKI.open() as src:
        corpus.write_text("".join(next(src) for _ in range(30)))
    store_dir = tmp_path / "store"
    args = _cli("-v", "ingest", str(corpus), "--collection", "wiki", "--path", str(store_dir), "--chunk-tokens", "48",
                "--overlap", "0", "--batch-size", "4", "--no-progress")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    batches = 0
    for line in proc.stderr:
        if "upserted batch" in line:
            batches += 1
            if batches == 3:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and batches == 3
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    written = int(summary.split("written ")[1].split(",")[0])
    unchanged = int(summary.split("unchanged ")[1].split(",")[0])
    assert unchanged >= 12 and written > 0

    from lclm_rag.store import LatentStore

    store = LatentStore.open("wiki", path=store_dir)
    stored = _stored(store)
    keys = [(p.payload["doc_id"], p.payload["chunk_index"]) for p in stored.values()]
    assert len(keys) == len(set(keys)) == store.count() == written + unchanged
    assert {d.split("#")[1] for d in store.doc_ids()} == {json.loads(line)["id"] for line in corpus.read_text().splitlines()}
    store.close()
    rerun = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert "written 0," in rerun.stdout


@pytest.mark.slow
def test_cli_exit_codes(tmp_path, docs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    (docs / "bad.txt").write_bytes(b"\x00\x01\x02")
    res = subprocess.run(_cli("ingest", str(docs), "--collection", "c", "--path", str(tmp_path / "s"), "--no-progress"),
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 1 and "bad.txt: binary file" in res.stderr
    assert "files 5, documents 4" in res.stdout
    res = subprocess.run(_cli("ingest", str(docs), "--collection", "c", "--path", str(tmp_path / "s"), "--shard", "3/2"),
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 2 and "--shard 3/2" in res.stderr
