import json

import pytest

from lclm_rag.evaluation.capacity import run_capacity_benchmark
from lclm_rag.store import LatentStore


@pytest.mark.slow
def test_capacity_measures_the_same_collection_with_latents_in_ram_and_on_disk(tmp_path):
    result = run_capacity_benchmark(n=500, workdir=tmp_path, output=tmp_path / "capacity.json", queries=20, top_k=3,
                                    latent_dtypes=("float16", "uint8"))
    ram, disk, ram8, disk8 = result["rows"]
    assert [(r["latent_dtype"], r["latents"]) for r in result["rows"]] == [
        ("float16", "in RAM"), ("float16", "on disk"), ("uint8", "in RAM"), ("uint8", "on disk")]
    for row in result["rows"]:
        assert row["passages"] == 500 and row["build_passages_per_s"] > 0
        assert row["rss_peak_queries_mb"] >= row["rss_after_open_mb"] >= row["rss_after_import_mb"] > 100
        assert row["rss_anon_mb"] > 0 and row["rss_file_mb"] > 0
        assert 0 < row["query_ms_p50"] <= row["query_ms_p95"]
    assert abs(ram["disk_mb"] - disk["disk_mb"]) < 0.2 * ram["disk_mb"]  # the same data, placed differently
    with LatentStore.open("capacity", path=tmp_path / "float16-latents-on-disk") as store:
        assert store.require().latents_on_disk is True
    with LatentStore.open("capacity", path=tmp_path / "uint8-latents-in-ram") as store:
        assert store.require().latent_dtype == "uint8"
    assert json.loads((tmp_path / "capacity.json").read_text())["rows"] == result["rows"]
    assert "500 passages" in (tmp_path / "capacity.md").read_text()
