"""What a second process, a bad path or a bad name does to a collection: refused cleanly, with the
running writer untouched (real processes, real files, the embedded engine)."""

import json
import subprocess
import sys
import textwrap
import time

import pytest
from test_store import SPEC, _passages

from lclm_rag.errors import InputError, StoreError
from lclm_rag.store import LatentStore

WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from test_store import SPEC, _passages
    from lclm_rag.errors import StoreError
    from lclm_rag.store import LatentStore
    try:
        store = LatentStore.open("c", path=sys.argv[1])
        store.bind(SPEC)
    except StoreError as exc:
        print("refused:", exc, flush=True)
        sys.exit(3)
    print("open", flush=True)
    for round in range(6):  # keeps writing while the other process tries to open the collection
        store.upsert(_passages(5, doc=f"doc-{round}"))
        time.sleep(0.5)
    print(store.count(), flush=True)
    store.close()
""")


def _start_writer(path, tests_dir):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(tests_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "open", proc.stderr.read()
    return proc


@pytest.mark.slow
def test_a_second_process_is_refused_and_the_writer_goes_on(tmp_path, request):
    path = tmp_path / "coll"
    writer = _start_writer(path, request.path.parent)
    for _ in range(3):  # a query, an ingest and a Python open all look like this to the store
        with pytest.raises(StoreError, match=r"open in another process \(pid \d+\)"):
            LatentStore.open("c", path=path)
        time.sleep(0.3)
    out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    assert out.strip() == "30"  # every batch of the writer landed
    with LatentStore.open("c", path=path) as store:  # and once it is gone the collection opens whole
        assert store.count() == 30


@pytest.mark.slow
def test_two_processes_creating_the_same_new_collection(tmp_path, request):
    path = tmp_path / "new"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(request.path.parent)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=120), p.stdout.read()) for p in procs)
    assert [code for code, _ in results] == [0, 3], results  # one creates and writes, the other is refused cleanly
    assert "open in another process" in results[1][1]
    with LatentStore.open("c", path=path) as store:
        assert store.count() == 30


def test_paths_that_cannot_hold_a_collection(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        LatentStore.open("c", path=a_file)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="holds other files"):
        LatentStore.open("c", path=tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    store = LatentStore.open("c", path=a_file / "coll")  # below a file: no directory can be made there
    with pytest.raises(StoreError, match="cannot use"):
        store.bind(SPEC)


@pytest.mark.parametrize("name", [".", "..", "a/b", "a\\\\b", "", " ", "-rf", "x" * 200, "name with space"])
def test_unsafe_collection_names_are_refused(name, tmp_path):
    with pytest.raises(InputError, match="collection name"):
        LatentStore.open(name, path=tmp_path / "c")


def test_the_lock_is_released_on_close(tmp_path):
    with LatentStore.open("c", path=tmp_path / "c") as store:
        store.bind(SPEC)
        store.upsert(_passages(2))
    with LatentStore.open("c", path=tmp_path / "c") as again:
        assert again.count() == 2
    assert json.loads((tmp_path / "c" / "lclm_collection.json").read_text())["fingerprint"] == SPEC.fingerprint


def _cli(*args, env=None, cwd=None):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lclm_rag.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _one_line_error(res, code: int, text: str) -> None:
    assert res.returncode == code, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and text in lines[-1], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_setup_mistakes_are_one_line_errors_with_their_own_exit_code(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _one_line_error(_cli("query", "", "--collection", "c"), 2, "the question is empty")  # before any model loads
    _one_line_error(_cli("query", "why? " * 3000, "--collection", "c"), 2, "the limit is 8,000")
    _one_line_error(_cli("query", "q", "--collection", ".."), 2, "collection name '..' is not allowed")
    _one_line_error(_cli("query", "q", "--collection", "c", "--path", str(a_file)), 3, "is a file")
    _one_line_error(_cli("ingest", str(tmp_path), "--collection", "c", env={"LCLM_RAG_HOME": str(a_file / "home")}), 3,
                    "LCLM_RAG_HOME=")
    _one_line_error(_cli("query", "q", "--collection", "c", "--qdrant-url", "http://127.0.0.1:9"), 3, "127.0.0.1:9 (REST)")
    _one_line_error(_cli("ingest", str(tmp_path), "--collection", "c", "--shard", "3/2"), 2, "--shard 3/2")
    assert "exit codes:" in _cli("--help").stdout


def _collection(tmp_path):
    path = tmp_path / "coll"
    with LatentStore.open("c", path=path) as store:
        store.bind(SPEC)
        store.upsert(_passages(4))
    return path


@pytest.mark.parametrize("spec_text", ['{"fingerprint": "ffff', "", "[]", '{"foo": 1}', "ratio", "latent_dtype"])
def test_a_damaged_spec_file_is_refused_with_its_path(tmp_path, spec_text):
    path = _collection(tmp_path)
    spec = path / "lclm_collection.json"
    if spec_text in ("ratio", "latent_dtype"):  # the right keys with values of the wrong type
        spec_text = json.dumps({**json.loads(spec.read_text()), spec_text: "4" if spec_text == "ratio" else "int3"})
    spec.write_text(spec_text)
    with pytest.raises(StoreError, match=f"{spec}.*restore it from a backup, or ingest into a new collection"):
        LatentStore.open("c", path=path)
    assert spec.read_text() == spec_text  # nothing rewritten


def test_points_without_a_spec_are_refused_never_relabelled(tmp_path):
    import dataclasses

    path = _collection(tmp_path)
    spec = path / "lclm_collection.json"
    saved = spec.read_text()
    spec.unlink()
    with pytest.raises(StoreError, match=r"holds 4 points but no collection spec \(lclm_collection.json\)"):
        LatentStore.open("c", path=path)
    assert not spec.exists()  # not relabelled (as float16, say) by an ingest that took it for a new collection
    spec.write_text(saved)
    with LatentStore.open("c", path=path) as store:  # the spec restored: the collection reads as before
        assert store.count() == 4 and store.spec.latent_dtype == SPEC.latent_dtype
        with pytest.raises(Exception, match="never mixes types"):
            store.bind(dataclasses.replace(SPEC, latent_dtype="uint8"))
    with LatentStore.open("c", path=tmp_path / "empty") as store:  # a shard created but no spec written yet, no points: new
        store.bind(SPEC)
    (tmp_path / "empty" / "lclm_collection.json").unlink()
    with LatentStore.open("c", path=tmp_path / "empty") as store:
        store.bind(SPEC)
        assert store.count() == 0


@pytest.mark.parametrize("damaged", ["payload_storage/page_0.dat", "vector_storage-latent/vectors/chunk_0.mmap", "edge_config.json"])
def test_a_truncated_engine_file_is_one_store_error_naming_the_collection(tmp_path, damaged):
    import os

    path = _collection(tmp_path)
    if damaged == "edge_config.json":  # the engine's own config gone: damaged, not "a folder of other files"
        (path / damaged).unlink()
        with pytest.raises(StoreError, match=f"collection at {path} has lost its edge_config.json.*restore {path} from a backup"):
            LatentStore.open("c", path=path)
        return
    (target,) = path.glob(f"segments/*/{damaged}")
    os.truncate(target, 100)
    with LatentStore.open("c", path=path) as store, pytest.raises(StoreError, match=f"collection at {path} failed to search.*restore {path} from a backup"):
        store.search(_passages(1)[0].dense, top_k=4)


@pytest.mark.slow
def test_bad_paths_and_a_damaged_collection_on_the_command_line(tmp_path, tiny_checkpoint):
    import os

    folder, store = tmp_path / "d", tmp_path / "s"
    folder.mkdir()
    (folder / "paris.txt").write_text("Paris is the capital of France. It lies on the Seine.")
    (folder / "selfloop").symlink_to("selfloop")
    os.mkfifo(folder / "notes.txt")
    args = ("ingest", str(folder), str(folder / "paris.txt"), "--collection", "c", "--path", str(store), "--checkpoint", tiny_checkpoint)
    res = _cli(*args)
    assert res.returncode == 1, res.stderr[-2000:]  # done, with failed sources; no hang on the FIFO
    assert "notes.txt: not a regular file (a FIFO)" in res.stderr and "selfloop: unreadable" in res.stderr
    assert "paris.txt: duplicate document id" in res.stderr and "documents 1, passages 1 (written 1" in res.stdout
    (store / "lclm_collection.json").unlink()
    _one_line_error(_cli(*args, "--latent-dtype", "float16"), 3, "holds 1 point but no collection spec")
    assert not (store / "lclm_collection.json").exists()
    _one_line_error(_cli("ingest", str(folder), "--collection", "c", "--path", str(tmp_path / "new"), "--chunk-tokens", "0"), 2,
                    "chunk_tokens must be positive")
    assert not (tmp_path / "new").exists()
