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
    assert hit.payload["doc_id"] == (docs / "eiffel_tower.md").resolve().as_posix() and hit.latents.shape[1] == ingestor.compressor.config.encoder_hidden_size
    assert {"source", "chunk_index", "start_char", "end_char", "num_tokens", "content_hash", "fingerprint", "ratio"} <= hit.payload.keys()

    again = ingestor.ingest_paths([docs], progress=False)
    assert again.written == 0 and again.skipped == first.passages and store.count() == first.passages

    # a changed document: new chunks in, old ones out, none left behind
    path = docs / "photosynthesis.txt"
    old_ids = store.ids_of_doc(path.resolve().as_posix())
    path.write_text("Photosynthesis happens in chloroplasts. " + path.read_text().replace("glucose", "sugar"))
    changed = ingestor.ingest_paths([docs], progress=False)
    new_ids = store.ids_of_doc(path.resolve().as_posix())
    assert changed.written == len(new_ids) and changed.deleted == len(old_ids) and not (old_ids & new_ids)
    stored_text = " ".join(p.text for p in store.retrieve(list(new_ids), with_latents=False))
    assert "sugar" in stored_text and "glucose" not in stored_text
    assert store.count() == first.passages - len(old_ids) + len(new_ids)

    # a deleted document is removed with prune
    (docs / "apollo_11.md").unlink()
    pruned = ingestor.ingest_paths([docs], prune=True, progress=False)
    assert pruned.pruned > 0 and (docs / "apollo_11.md").resolve().as_posix() not in store.doc_ids()
    store.close()


def test_a_sidecar_model_stores_each_passages_key_terms(tmp_path, docs, make_compressor, embedder, monkeypatch):
    from lclm_rag.sidecar import key_terms

    monkeypatch.chdir(tmp_path)
    store = open_test_store("edge", tmp_path)
    Ingestor(store, make_compressor(ratio=4, sidecar_terms=3), embedder, chunk_tokens=64, overlap=8).ingest_paths([docs], progress=False)
    stored = _stored(store).values()
    assert stored and all(p.payload["key_terms"] == key_terms(p.text, 3) for p in stored)
    assert any(p.payload["key_terms"] for p in stored)
    store.close()
    plain = open_test_store("edge", tmp_path / "plain")
    Ingestor(plain, make_compressor(ratio=4), embedder, chunk_tokens=64, overlap=8).ingest_paths([docs], progress=False)
    assert all("key_terms" not in p.payload for p in _stored(plain).values())  # a model that reads no sidecar: none stored
    plain.close()


def test_bad_files_are_reported_and_stored_data_is_untouched(tmp_path, docs, make_compressor, embedder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_test_store("edge", tmp_path)
    ingestor = Ingestor(store, make_compressor(ratio=4), embedder, chunk_tokens=64, batch_size=8)
    ingestor.ingest_paths([docs], progress=False)
    before = store.count()
    reef = (docs / "great_barrier_reef.txt").resolve().as_posix()
    reef_ids = store.ids_of_doc(reef)
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
    assert store.ids_of_doc(reef) == reef_ids  # failed file: its stored chunks stay
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
    with pytest.raises(InputError, match="field 'score' is nan"):  # refused before anything is written
        ingestor.ingest_documents([Document(text="Storks migrate.", metadata={"score": float("nan")})])
    assert store.count() == 2


def test_latent_placement_is_chosen_at_creation(tmp_path, make_compressor, embedder):
    store = open_test_store("edge", tmp_path)
    compressor = make_compressor(ratio=4)
    from llama_index.core import Document

    Ingestor(store, compressor, embedder, latents_on_disk=True).ingest_documents([Document(text="Mount Everest is 8,849 metres high.")])
    assert Ingestor(store, compressor, embedder).spec.latents_on_disk is True  # a re-run without the flag keeps it
    with pytest.raises(InputError, match="keeps its latents on disk; that is chosen when a collection is created"):
        Ingestor(store, compressor, embedder, latents_on_disk=False)
    assert store.count() == 1
    store.close()


def test_new_collections_store_uint8_and_existing_float16_ones_stay_float16(tmp_path, make_compressor, embedder):
    from llama_index.core import Document

    compressor = make_compressor(ratio=4)
    new = open_test_store("edge", tmp_path, name="new")
    Ingestor(new, compressor, embedder).ingest_documents([Document(text="Mount Everest is 8,849 metres high.")])
    assert new.require().latent_dtype == "uint8"
    new.close()
    old = open_test_store("edge", tmp_path, name="old")
    Ingestor(old, compressor, embedder, latent_dtype="float16").ingest_documents([Document(text="Paris is the capital of France.")])
    again = Ingestor(old, compressor, embedder)  # a later run without the option
    again.ingest_documents([Document(text="Photosynthesis makes glucose.")])
    assert (again.spec.latent_dtype, old.require().latent_dtype, old.count()) == ("float16", "float16", 2)
    old.close()


def _cli(*args, **kw):
    return [sys.executable, "-m", "lclm_rag.cli", *args]


@pytest.mark.slow
@pytest.mark.usefixtures("shared_data")
def test_kill_9_then_rerun_stores_every_passage_exactly_once(tmp_path, tiny_checkpoint):
    corpus = tmp_path / "wiki.jsonl"
    with SHARED_WIKI.open() as src:
        corpus.write_text("".join(next(src) for _ in range(30)))
    store_dir = tmp_path / "store"
    args = _cli("-v", "ingest", str(corpus), "--collection", "wiki", "--path", str(store_dir), "--chunk-tokens", "48",
                "--checkpoint", tiny_checkpoint,  # the tiny model: what is tested is the writing
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


def test_document_ids_do_not_depend_on_the_working_directory(tmp_path, docs, make_compressor, embedder, monkeypatch):
    store = open_test_store("edge", tmp_path)
    ingestor = Ingestor(store, make_compressor(ratio=4), embedder, chunk_tokens=64, batch_size=8)
    monkeypatch.chdir(tmp_path)
    first = ingestor.ingest_paths(["docs"], progress=False)  # cd a && ingest corp
    monkeypatch.chdir(docs.parent.parent)
    second = ingestor.ingest_paths([docs.relative_to(docs.parent.parent)], progress=False)  # ingest a/corp
    monkeypatch.chdir("/")
    third = ingestor.ingest_paths([docs.resolve()], progress=False)  # cd / && ingest /abs/a/corp
    assert second.written == third.written == 0 and store.count() == first.written  # stored once
    single = ingestor.ingest_paths([docs / "eiffel_tower.md"], progress=False)  # one file of the folder: the same id
    assert single.written == 0 and single.skipped > 0
    store.close()


def test_documents_stored_under_relative_ids_keep_them(tmp_path, docs, make_compressor, embedder, monkeypatch):
    from lclm_rag.ingest import SourceDocument

    monkeypatch.chdir(tmp_path)
    store = open_test_store("edge", tmp_path)
    ingestor = Ingestor(store, make_compressor(ratio=4), embedder, chunk_tokens=64, batch_size=8)
    text = (docs / "eiffel_tower.md").read_text()
    ingestor.ingest_sources([SourceDocument("docs/eiffel_tower.md", text, "docs/eiffel_tower.md")])  # as earlier releases stored it
    before = store.count()
    report = ingestor.ingest_paths([docs / "eiffel_tower.md"], progress=False)
    assert report.written == 0 and store.count() == before and store.doc_ids() == {"docs/eiffel_tower.md"}
    store.close()


def test_an_unreadable_directory_is_a_failed_source_and_its_documents_survive_prune(tmp_path, docs, make_compressor, embedder, monkeypatch):
    import os

    sub = docs / "more"
    sub.mkdir()
    (sub / "nile.txt").write_text("The Nile is a major north-flowing river in northeastern Africa.")
    store = open_test_store("edge", tmp_path)
    ingestor = Ingestor(store, make_compressor(ratio=4), embedder, chunk_tokens=64, batch_size=8)
    ingestor.ingest_paths([docs], progress=False)
    nile = (sub / "nile.txt").resolve().as_posix()
    assert nile in store.doc_ids()
    real_scandir = os.scandir

    def scandir(path="."):  # what the OS does to a directory this process may not list
        if Path(path) == sub:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = ingestor.ingest_paths([docs], prune=True, progress=False)
    assert [(Path(f.source).name, f.reason) for f in report.failed] == [("more", "unreadable directory: Permission denied")]
    assert nile in store.doc_ids() and report.pruned == 0  # not deleted for being unreadable
    with pytest.raises(InputError, match="unreadable directory"):
        ingestor.ingest_paths([docs], strict=True, progress=False)
    store.close()


def test_text_is_checked_beyond_its_first_8_kb(tmp_path):
    from lclm_rag.ingest import read_file

    body = "A plain sentence about rivers. " * 400  # ~12 KB
    (tmp_path / "nul.txt").write_bytes(body.encode() + b"\x00tail")
    with pytest.raises(InputError, match="NUL byte at byte 12400"):
        read_file(tmp_path / "nul.txt")
    (tmp_path / "control.txt").write_bytes(body.encode() + b"bell\x07 and escape\x1b[0m end")
    (doc,) = read_file(tmp_path / "control.txt")
    assert "\x07" not in doc.text and "\x1b" not in doc.text and doc.text.endswith("bell  and escape [0m end")
    assert len(doc.text) == len(body) + len("bell\x07 and escape\x1b[0m end")  # same length: spans stay true


def _pdf(text: str) -> bytes:
    """A one-page PDF holding ``text`` (hand-written objects, a valid xref table)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (i, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _docx(text: str) -> bytes:
    """A minimal Word document holding ``text`` in one paragraph."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
                   '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
                   '<Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" '
                   'ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>')
        z.writestr("_rels/.rels", '<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
                   '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" '
                   'Target="word/document.xml"/></Relationships>')
        z.writestr("word/document.xml", '<?xml version="1.0"?><w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
                   f'<w:body><w:p><w:r><w:t>{text}</w:t></w:r></w:p></w:body></w:document>')
    return buffer.getvalue()


def test_pdf_and_docx_are_read_and_found_and_a_corrupt_one_is_reported(tmp_path, make_compressor, embedder):
    folder = tmp_path / "office"
    folder.mkdir()
    (folder / "volcano.pdf").write_bytes(_pdf("Mount Etna is an active stratovolcano on the east coast of Sicily."))
    (folder / "orchid.docx").write_bytes(_docx("The vanilla orchid is pollinated by hand on Madagascar farms."))
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a pdf body")
    store = open_test_store("edge", tmp_path)
    report = Ingestor(store, make_compressor(ratio=4), embedder, chunk_tokens=64).ingest_paths([folder], progress=False)
    assert [Path(f.source).name for f in report.failed] == ["broken.pdf"] and report.documents == 2
    for question, name in (("Which volcano is in Sicily?", "volcano.pdf"), ("How is vanilla pollinated?", "orchid.docx")):
        hit = store.search(embedder.embed([question])[0], top_k=1)[0]
        assert hit.payload["doc_id"].endswith(name) and ("Etna" in hit.text or "vanilla" in hit.text)
    store.close()


def _owls_and_bats(folder: Path) -> Path:
    """A folder whose JSONL records carry fields named like the system's (``doc_id`` naming another file)."""
    folder.mkdir()
    shutil.copy(EXAMPLE_DOCS / "eiffel_tower.md", folder / "eiffel.txt")
    (folder / "moon.md").write_text("The Moon is Earth's only natural satellite. It orbits at about 384,000 km.")
    eiffel = (folder / "eiffel.txt").resolve().as_posix()
    (folder / "meta.jsonl").write_text(
        json.dumps({"id": "r1", "text": "Owls are birds of prey that hunt mostly at night.", "doc_id": eiffel}) + "\n"
        + json.dumps({"id": "r2", "text": "Bats are flying mammals that use echolocation.", "doc_id": "something-else",
                      "chunk_index": 7, "topic": "bats"}) + "\n"
        + json.dumps({"id": "r3", "text": "Storks migrate to Africa in autumn.", "source": "elsewhere"}) + "\n")
    return folder


def test_a_records_own_fields_never_replace_the_systems(tmp_path, make_compressor, embedder, monkeypatch):
    from lclm_rag.ingest import pipeline

    folder = _owls_and_bats(tmp_path / "d")
    store = open_test_store("edge", tmp_path)
    ingestor = Ingestor(store, make_compressor(ratio=4), embedder, chunk_tokens=64, batch_size=8)
    with monkeypatch.context() as old:  # a collection an earlier release wrote: the record's doc_id replaced the system's
        old.setattr(pipeline, "with_user_fields", lambda system, user: ({**system, **user}, []))
        ingestor.ingest_paths([folder], progress=False)
    total = store.count()
    first = ingestor.ingest_paths([folder], prune=True, progress=False)  # rewrites the three records' payloads, loses nothing
    assert (first.written, first.deleted, first.pruned, store.count()) == (3, 0, 0, total)
    for _ in range(2):
        again = ingestor.ingest_paths([folder], prune=True, progress=False)
        assert (again.written, again.deleted, again.pruned, store.count()) == (0, 0, 0, total)
    meta = (folder / "meta.jsonl").resolve().as_posix()
    owl, bat = (_stored(store)[next(iter(store.ids_of_doc(f"{meta}#{r}")))] for r in ("r1", "r2"))
    assert owl.payload["user_fields"] == {"doc_id": (folder / "eiffel.txt").resolve().as_posix()}
    assert bat.payload["chunk_index"] == 0 and bat.payload["user_fields"] == {"chunk_index": 7, "doc_id": "something-else"}
    assert bat.payload["topic"] == "bats"  # other fields keep their place
    (stork,) = store.retrieve(list(store.ids_of_doc(f"{meta}#r3")), with_latents=False)
    assert stork.payload["source"] == str(folder / "meta.jsonl") and stork.payload["user_fields"] == {"source": "elsewhere"}
    assert again.renamed == {str(folder / "meta.jsonl"): {"doc_id", "chunk_index", "source"}}
    store.close()


def test_prune_protects_exactly_a_failed_files_documents(tmp_path, make_compressor, embedder):
    folder = tmp_path / "d"
    folder.mkdir()
    records = '{"id": "a", "text": "Owls hunt at night."}\n{"id": "b", "text": "Bats use echolocation."}\n'
    for name in ("notes#2024.jsonl", "plain.jsonl"):
        (folder / name).write_text(records)
    (folder / "notes").write_text("A file whose id is where the '#' file's id would be cut.")
    store = open_test_store("edge", tmp_path)
    ingestor = Ingestor(store, make_compressor(ratio=4), embedder, chunk_tokens=64, batch_size=8)
    ingestor.ingest_paths([folder], progress=False)
    assert store.count() == 5
    for name in ("notes#2024.jsonl", "plain.jsonl"):
        with (folder / name).open("a") as f:
            f.write("{broken\n")
    (folder / "notes").unlink()
    report = ingestor.ingest_paths([folder], prune=True, progress=False)
    assert sorted(Path(f.source).name for f in report.failed) == ["notes#2024.jsonl", "plain.jsonl"]
    assert report.pruned == 1 and store.count() == 4  # only the deleted file's passage; both failed files' records stay
    assert (folder / "notes").resolve().as_posix() not in store.doc_ids()
    store.close()


def test_one_bad_path_is_one_failed_source_and_the_rest_is_ingested(tmp_path, make_compressor, embedder):
    import threading

    folder, outside = tmp_path / "d", tmp_path / "outside"
    folder.mkdir(), outside.mkdir()
    (folder / "paris.txt").write_text("Paris is the capital of France. It lies on the Seine.")
    (folder / "selfloop").symlink_to("selfloop")
    (folder / "five.json").write_text("5")
    (folder / "null.json").write_text("null")
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (folder / "alias.txt").symlink_to("paris.txt")  # the same document under a second name
    (folder / "ids.jsonl").write_text('{"id": 1, "text": "Owls hunt at night."}\n{"id": "1", "text": "Bats use echolocation."}\n')
    (folder / "nul.jsonl").write_text(json.dumps({"text": "Owls\u0000 hunt."}) + "\n")
    (folder / "nan.jsonl").write_text('{"text": "Storks migrate.", "score": NaN}\n')
    (outside / "nile.txt").write_text("The Nile flows north through Africa.")
    (folder / "linked").symlink_to(outside)  # a symbolic link to a directory is followed
    (folder / "up").symlink_to(".")  # a link back up is reported, not walked forever
    fifo = folder / "notes.txt"
    os.mkfifo(fifo)
    unblock = threading.Timer(60, lambda: open(fifo, "w").close())  # should the read ever block again, end it
    unblock.daemon = True
    unblock.start()
    store = open_test_store("edge", tmp_path)
    ingestor = Ingestor(store, make_compressor(ratio=4), embedder, chunk_tokens=64, batch_size=8)
    report = ingestor.ingest_paths([folder, folder / "paris.txt"], progress=False)
    unblock.cancel()
    reasons = {(Path(f.source).name, f.reason.split(" (")[0].split(":")[0]) for f in report.failed}
    assert reasons == {("selfloop", "unreadable"), ("five.json", "a JSON file holds an object or a list of objects, not int"),
                       ("null.json", "a JSON file holds an object or a list of objects, not NoneType"),
                       ("deep.json", "invalid JSON"), ("paris.txt", "duplicate document id '" + (folder / "paris.txt").resolve().as_posix() + "'"),
                       ("ids.jsonl", "duplicate document id '" + (folder / "ids.jsonl").resolve().as_posix() + "#1'"),
                       ("nul.jsonl", "record 0"), ("nan.jsonl", "document '" + (folder / "nan.jsonl").resolve().as_posix() + "#0'"),
                       ("up", "symbolic link to a directory already read"), ("notes.txt", "not a regular file")}, reasons
    assert "Too many levels of symbolic links" in next(f.reason for f in report.failed if f.source.endswith("selfloop"))
    texts = sorted(p.text for p in _stored(store).values())
    assert texts == ["Owls hunt at night.", "Paris is the capital of France. It lies on the Seine.", "The Nile flows north through Africa."]
    assert (outside / "nile.txt").resolve().as_posix() in store.doc_ids()
    with pytest.raises(InputError, match="deep.json: invalid JSON"):  # --strict still stops at the first, in path order
        ingestor.ingest_paths([folder], strict=True, progress=False)
    store.close()


def test_chunk_settings_are_checked_before_a_collection_is_created(tmp_path, make_compressor, embedder):
    from lclm_rag.errors import ConfigError

    store = open_test_store("edge", tmp_path)
    for settings in ({"chunk_tokens": 0}, {"chunk_tokens": 8, "overlap": 8}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            Ingestor(store, make_compressor(ratio=4), embedder, **settings)
    store.close()
    assert not (tmp_path / "edge").exists()
