import numpy as np
import pytest
import torch
from conftest import BACKENDS, open_test_store

from lclm_rag.errors import CompressorMismatchError, InputError, StoreError
from lclm_rag.store import CollectionSpec, LatentStore, StoredPassage, point_id

SPEC = CollectionSpec(fingerprint="f" * 32, ratio=4, latent_dim=576, embedding_model="minilm", embedding_dim=384)


def _passages(n: int, doc: str = "doc-a"):
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        dense = torch.randn(384, generator=gen)
        out.append(StoredPassage(
            id=point_id(doc, i, f"h{i}"), text=f"passage {i} of {doc}",
            payload={"doc_id": doc, "chunk_index": i}, dense=(dense / dense.norm()).numpy(),
            latents=torch.randn(3 + i, 576, generator=gen) * 3,
        ))
    return out


@pytest.mark.parametrize("kind", BACKENDS)
def test_round_trip_search_retrieve_delete(kind, tmp_path):
    store = open_test_store(kind, tmp_path)
    store.bind(SPEC)
    passages = _passages(5) + _passages(2, doc="doc-b")
    store.upsert(passages)
    assert store.count() == 7
    hits = store.search(passages[3].dense, top_k=3)
    assert hits[0].id == passages[3].id and hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert hits[0].payload["doc_id"] == "doc-a" and hits[0].payload["fingerprint"] == SPEC.fingerprint
    # latents come back with the hit, at float16 precision (edge stores float16 itself)
    torch.testing.assert_close(hits[0].latents, passages[3].latents, atol=1e-6, rtol=2**-10)
    if kind == "edge":
        assert torch.equal(hits[0].latents, passages[3].latents.half().float())
    got = {p.id: p for p in store.retrieve([passages[0].id, passages[6].id])}
    assert got[passages[6].id].latents.shape == (4, 576) and got[passages[6].id].text == "passage 1 of doc-b"
    assert store.ids_of_doc("doc-b") == {passages[5].id, passages[6].id}
    assert store.doc_ids() == {"doc-a", "doc-b"}
    store.delete(store.ids_of_doc("doc-a"))
    assert store.count() == 2 and store.doc_ids() == {"doc-b"}
    store.close()


@pytest.mark.parametrize("kind", ["edge", "qdrant-path"])
def test_persisted_collection_remembers_its_compressor(kind, tmp_path):
    store = open_test_store(kind, tmp_path)
    store.bind(SPEC)
    store.upsert(_passages(2))
    store.close()
    store = open_test_store(kind, tmp_path)
    assert store.spec == SPEC and store.count() == 2
    other = CollectionSpec(fingerprint="0" * 32, ratio=8, latent_dim=576, embedding_model="minilm", embedding_dim=384)
    with pytest.raises(CompressorMismatchError, match="f{32}.*0{32}"):
        store.bind(other)
    with pytest.raises(CompressorMismatchError, match="model's compressor is 0{32}"):
        store.require(other.fingerprint)
    assert store.count() == 2  # nothing touched
    store.close()


def test_unknown_collection_and_bad_input(tmp_path):
    store = LatentStore.open("nothing-here", path=tmp_path / "x")
    with pytest.raises(StoreError, match="'nothing-here' does not exist"):
        store.search(np.zeros(384, dtype=np.float32), top_k=3)
    with pytest.raises(InputError, match="collection name"):
        LatentStore.open("a/b", path=tmp_path / "y")
    store = LatentStore.open("ok", location=":memory:")
    store.bind(SPEC)
    bad = _passages(1)[0]
    bad.latents = torch.zeros(2, 100)
    with pytest.raises(InputError, match=r"latents must be \(n, 576\)"):
        store.upsert([bad])


@pytest.mark.parametrize("grpc", [True, False])
def test_unreachable_server_fails_clearly_after_bounded_retries(grpc):
    import time

    start = time.perf_counter()
    with pytest.raises(StoreError, match=r"Qdrant at http://127.0.0.1:9 \(REST\) did not answer after 3 attempts"):
        LatentStore.open("c", url="http://127.0.0.1:9", prefer_grpc=grpc, retries=3, retry_wait=0.01, timeout=2)
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("kind", BACKENDS)
def test_uint8_latents_take_one_byte_a_value_and_come_back_within_half_a_step(kind, tmp_path):
    import dataclasses

    spec = dataclasses.replace(SPEC, latent_dtype="uint8")
    store = open_test_store(kind, tmp_path)
    store.bind(spec)
    passages = _passages(4)
    originals = [p.latents.clone() for p in passages]
    store.upsert(passages)
    assert all(torch.equal(p.latents, o) for p, o in zip(passages, originals))  # the caller's latents are untouched
    for p, original in zip(store.retrieve([p.id for p in passages]), [dict(zip([q.id for q in passages], originals))[p.id] for p in store.retrieve([q.id for q in passages])]):
        step = (original.max(1).values - original.min(1).values) / 255
        assert ((p.latents - original).abs() <= step[:, None] / 2 + 1e-4).all()
        assert "latent_scale" not in p.payload and "latent_offset" not in p.payload
    hit = store.search(passages[2].dense, top_k=1)[0]
    assert hit.id == passages[2].id and hit.latents.shape == originals[2].shape
    with pytest.raises(CompressorMismatchError, match="stores latents as uint8, not float16"):
        store.bind(SPEC)  # one collection never mixes types
    store.close()
    with pytest.raises(InputError, match="latent_dtype must be one of"):
        open_test_store(kind, tmp_path, name="other").bind(dataclasses.replace(SPEC, latent_dtype="int4"))


@pytest.mark.parametrize("latent_dtype", ["float16", "uint8"])
def test_as_stored_gives_what_a_collection_of_that_type_gives_back(latent_dtype, tmp_path):
    import dataclasses

    from lclm_rag.store.quantize import as_stored

    store = open_test_store("edge", tmp_path)
    store.bind(dataclasses.replace(SPEC, latent_dtype=latent_dtype))
    passages = _passages(3)
    expected = {p.id: as_stored(p.latents, latent_dtype) for p in passages}
    store.upsert(passages)
    for p in store.retrieve(list(expected)):
        torch.testing.assert_close(p.latents.float(), expected[p.id], atol=1e-6, rtol=0)
    assert not torch.equal(expected[passages[0].id], passages[0].latents.float())  # storing does change them
    store.close()
    with pytest.raises(ValueError, match="latent_dtype must be one of"):
        as_stored(passages[0].latents, "int4")


@pytest.mark.parametrize("kind", BACKENDS)
def test_latents_on_disk_are_the_collections_placement_and_read_back_the_same(kind, tmp_path):
    import dataclasses
    import json

    store = open_test_store(kind, tmp_path)
    store.bind(dataclasses.replace(SPEC, latents_on_disk=True))
    passages = _passages(4)
    store.upsert(passages)
    hit = store.search(passages[1].dense, top_k=1)[0]
    torch.testing.assert_close(hit.latents, passages[1].latents, atol=1e-6, rtol=2**-10)
    if kind == "edge":  # the engine's own config of the collection: the latent vectors are not held in RAM
        placed = json.loads((store.backend.dir / "edge_config.json").read_text())["vectors"]
        assert placed["latent"]["memory"] == "cold" and "memory" not in placed["dense"]
    else:
        params = store.backend.client.get_collection(store.name).config.params.vectors
        assert params["latent"].on_disk is True and not params["dense"].on_disk
    store.optimize()  # merges what was written; the latents read back the same
    torch.testing.assert_close(store.search(passages[1].dense, top_k=1)[0].latents, hit.latents)
    store.bind(SPEC)  # a reader that does not ask keeps the collection's placement
    assert store.spec.latents_on_disk is True
    in_ram = open_test_store(kind, tmp_path / "second", name="ram")
    in_ram.bind(SPEC)
    assert in_ram.spec.latents_on_disk is False


@pytest.mark.slow
def test_opening_an_embedded_collection_leaves_no_replay_scratch_resident(tmp_path):
    """Opening replays the engine's log: ~0.6 GB of scratch for 2,000 passages of real shapes, freed
    but kept mapped by glibc unless given back. Measured in a fresh process, as a user opens it."""
    import subprocess
    import sys

    from lclm_rag.evaluation.capacity import build_collection

    build_collection(tmp_path, 2000, latents_on_disk=False)
    probe = (
        "import sys\n"
        "def anon():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')) / 1024\n"
        "from lclm_rag.store import LatentStore\n"
        "before = anon()\n"
        "with LatentStore.open('capacity', path=sys.argv[1]) as store:\n"
        "    assert store.count() == 2000\n"
        "    print(anon() - before)\n"
    )
    grown = float(subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True,
                                 check=True).stdout.split()[-1])
    assert grown < 150, f"opening 2,000 passages left {grown:.0f} MB of heap resident"
