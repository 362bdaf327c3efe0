import json

import pytest

from lclm_rag.evaluation.capacity import run_capacity_benchmark
from lclm_rag.store import LatentStore


@pytest.mark.slow
def test_capacity_measures_the_same_collection_with_latents_in_ram_and_on_disk(tmp_path):
    result = run_capacity_benchmark(n=500, workdir=tmp_path, output=tmp_path / "capacity.json", queries=20, top_k=3)
    ram, disk = result["rows"]
    assert (ram["latents"], disk["latents"]) == ("in RAM", "on disk")
    for row in (ram, disk):
        assert row["passages"] == 500 and row["build_passages_per_s"] > 0
        assert row["rss_peak_queries_mb"] >= row["rss_after_open_mb"] >= row["rss_after_import_mb"] > 100
        assert 0 < row["query_ms_p50"] <= row["query_ms_p95"]
    assert abs(ram["disk_mb"] - disk["disk_mb"]) < 0.2 * ram["disk_mb"]  # the same data, placed differently
    with LatentStore.open("capacity", path=tmp_path / "latents-on-disk") as store:
        assert store.require().latents_on_disk is True
    assert json.loads((tmp_path / "capacity.json").read_text())["rows"] == result["rows"]
    assert "500 passages" in (tmp_path / "capacity.md").read_text()
