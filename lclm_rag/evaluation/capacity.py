"""What a large collection costs to hold: resident memory and query latency with latents in RAM
against latents on disk (``latents_on_disk``), on the embedded engine.

The collections are filled with random unit dense vectors and random latents of the real shapes
(``chunk_tokens / ratio`` vectors of the encoder width per passage): bytes, memory placement and
the engine's work per query depend on the shapes, not on the values, and 100k real passages would
take hours to compress here. Each collection is measured in a fresh process, so the numbers are
that process's resident memory after import, after opening the collection, and at its peak over
the queries.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def build_collection(path: str | Path, n: int, *, latents_on_disk: bool, latent_dtype: str = "float16", ratio: int = 4,
                     chunk_tokens: int = 64, latent_dim: int = 576, embedding_dim: int = 384, batch: int = 1000,
                     seed: int = 0) -> float:
    """Write ``n`` random passages of the given shapes; returns the seconds it took."""
    import torch

    from lclm_rag.store import CollectionSpec, LatentStore, StoredPassage, point_id

    gen = torch.Generator().manual_seed(seed)
    spec = CollectionSpec("0" * 32, ratio, latent_dim, "random", embedding_dim, latent_dtype=latent_dtype,
                          latents_on_disk=latents_on_disk)
    start = time.perf_counter()
    with LatentStore.open("capacity", path=path) as store:
        store.bind(spec)
        for first in range(0, n, batch):
            size = min(batch, n - first)
            dense = torch.nn.functional.normalize(torch.randn(size, embedding_dim, generator=gen), dim=1).numpy()
            latents = torch.randn(size, chunk_tokens // ratio, latent_dim, generator=gen)
            store.upsert([StoredPassage(point_id("capacity", first + i, str(first + i)), f"passage {first + i}",
                                        {"doc_id": f"doc-{(first + i) // 10}", "chunk_index": first + i}, dense[i], latents[i])
                          for i in range(size)])
        store.optimize()  # the state a finished bulk ingest leaves: optimized segments
    return time.perf_counter() - start


def measure_collection(path: str | Path, queries: int = 200, top_k: int = 5, seed: int = 1) -> dict:
    """In this process: resident memory before and after opening ``path``, and over ``queries``
    top-k searches that return latents; query latency. Run it in a fresh process."""
    import psutil
    import torch

    from lclm_rag.evaluation.measure import PeakRSS
    from lclm_rag.store import LatentStore

    proc = psutil.Process()
    mb = lambda: proc.memory_info().rss / 2**20
    after_import = mb()
    gen = torch.Generator().manual_seed(seed)
    with LatentStore.open("capacity", path=path) as store:
        after_open = mb()
        dim = store.require().embedding_dim
        vectors = torch.nn.functional.normalize(torch.randn(queries, dim, generator=gen), dim=1).numpy()
        seconds = []
        with PeakRSS() as peak:
            for v in vectors:
                t = time.perf_counter()
                hits = store.search(v, top_k, with_latents=True)
                seconds.append(time.perf_counter() - t)
                if len(hits) != top_k or hits[0].latents is None:
                    raise RuntimeError(f"{path}: a search returned {len(hits)} hits (wanted {top_k}, with latents)")
        count = store.count()
        split = resident_split_mb()  # while the collection is open, after its queries
    ms = sorted(1000 * s for s in seconds)
    return {"passages": count, **split, "rss_after_import_mb": round(after_import, 1), "rss_after_open_mb": round(after_open, 1),
            "rss_peak_queries_mb": round(peak.peak_bytes / 2**20, 1),
            "collection_rss_mb": round(peak.peak_bytes / 2**20 - after_import, 1),
            "query_ms_mean": round(statistics.fmean(ms), 2), "query_ms_p50": round(ms[len(ms) // 2], 2),
            "query_ms_p95": round(ms[int(len(ms) * 0.95)], 2)}


def resident_split_mb() -> dict:
    """This process's resident memory now, split as Linux accounts it: anonymous pages (the heap:
    what the engine holds) and file-backed pages (mapped files: page cache the kernel drops under
    pressure and reads again on demand). Empty where /proc is not there."""
    fields = {"RssAnon": "rss_anon_mb", "RssFile": "rss_file_mb"}
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in fields:
            out[fields[key]] = round(int(value.split()[0]) / 1024, 1)
    return out


def run_capacity_benchmark(n: int = 100_000, workdir: str | Path | None = None, output: str | Path | None = None,
                           queries: int = 200, top_k: int = 5, latent_dtypes=("float16",)) -> dict:
    """Build the same ``n``-passage collection with latents in RAM and on disk (per latent type);
    measure each in a fresh process. Returns (and writes to ``output``) one row per collection."""
    import tempfile

    from lclm_rag.evaluation.measure import machine_info, markdown_table
    from lclm_rag.store import directory_bytes

    work = Path(workdir or tempfile.mkdtemp(prefix="lclm-capacity-"))
    rows = []
    for latent_dtype, on_disk in [(d, o) for d in latent_dtypes for o in (False, True)]:
        path = work / f"{latent_dtype}-{'latents-on-disk' if on_disk else 'latents-in-ram'}"
        build_s = build_collection(path, n, latents_on_disk=on_disk, latent_dtype=latent_dtype) if not path.exists() else None
        code = ("import json, sys; from lclm_rag.evaluation.capacity import measure_collection; "
                f"print(json.dumps(measure_collection(sys.argv[1], {queries}, {top_k})))")
        res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
        row = {"latent_dtype": latent_dtype, "latents": "on disk" if on_disk else "in RAM", **json.loads(res.stdout.strip().splitlines()[-1]),
               "disk_mb": round(directory_bytes(path) / 2**20, 1)}
        if build_s is not None:
            row["build_passages_per_s"] = round(n / build_s, 1)
        rows.append(row)
    result = {"machine": machine_info(), "n": n, "top_k": top_k, "queries": queries,
              "shapes": "64-token passages at 1:4: 16 latents x 576; 384-d dense", "rows": rows}
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2))
        Path(output).with_suffix(".md").write_text(
            f"Measured {result['machine']['date']} on {result['machine']['cores']} cores: {n:,} passages "
            f"({result['shapes']}), {queries} top-{top_k} searches with latents.\n\n" + markdown_table(rows) + "\n")
    return result
