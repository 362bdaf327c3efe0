"""Benchmarks: compression throughput, decoder time to first token and query latency against k,
ingestion throughput and storage, measured in one run.

Results go to JSON and a markdown table (``lclm-rag bench`` writes them under runs/bench/); the
recorded ones, with date and machine, are in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from lclm_rag.chunking import chunk_text
from lclm_rag.compressor import LatentCompressor
from lclm_rag.config import LatentConfig
from lclm_rag.evaluation.measure import PeakRSS, machine_info, markdown_table, median_seconds

REPO_ROOT = Path(__file__).resolve().parents[2]


def sample_passages(tokenizer, n: int, tokens: int = 128) -> list[str]:
    """``n`` passages of exactly-ish ``tokens`` tokens from the shared corpus or the example docs."""
    sources = [REPO_ROOT.parent / "shared/data/corpus/wiki_summaries.jsonl"]
    texts: list[str] = []
    for src in sources:
        if src.exists():
            with src.open() as fh:
                for line in fh:
                    texts.append(json.loads(line)["text"])
                    if len(texts) > 4 * n:
                        break
    for doc in sorted((REPO_ROOT / "examples/docs").glob("*")) if not texts else []:
        texts.append(doc.read_text())
    out = []
    for text in texts:
        out.extend(c.text for c in chunk_text(text, tokenizer, tokens, overlap=0) if c.num_tokens == tokens)
        if len(out) >= n:
            break
    if not out:
        raise RuntimeError("no benchmark text found (need ../shared/data or examples/docs)")
    while len(out) < n:
        out.extend(out[: n - len(out)])
    return out[:n]


def bench_compression(encoder: str, layer_options: list[int | None], ratios: list[int], batches: list[int], n: int) -> list[dict]:
    rows = []
    for layers in layer_options:
        base = LatentCompressor(LatentConfig(encoder=encoder, encoder_layers=layers, ratio=ratios[0])).eval()
        passages = sample_passages(base.tokenizer, n)
        tokens = sum(len(t) for t in base.tokenize(passages))
        for ratio in ratios:
            comp = LatentCompressor(LatentConfig(encoder=encoder, encoder_layers=layers, ratio=ratio), encoder=base.encoder, tokenizer=base.tokenizer).eval()
            comp.compress(passages[:2])  # warm-up
            for batch in batches:
                seconds = median_seconds(lambda: comp.compress(passages, batch_size=batch), 1)
                rows.append({
                    "encoder_layers": layers or base.encoder.config.num_hidden_layers,
                    "ratio": ratio, "batch": batch, "passages": n,
                    "passages_per_s": round(n / seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                })
    return rows


def bench_ttft(model, ks: list[int], ratios: list[int], repeats: int = 3, new_tokens: int = 32) -> list[dict]:
    """k passages of 128 tokens as latents at each ratio vs raw text: time to first token (prefill
    + one token), end-to-end time for exactly ``new_tokens`` tokens, the decoder's KV-cache size
    and the process's peak memory."""
    dec = model.decoder
    lm_config = dec.model.config
    kv_bytes_per_position = 2 * lm_config.num_hidden_layers * lm_config.num_key_value_heads * (
        getattr(lm_config, "head_dim", None) or lm_config.hidden_size // lm_config.num_attention_heads) * 4
    passages = sample_passages(model.compressor.tokenizer, max(ks))
    question = "What is the main topic of these passages?"
    latents_by_ratio = {}
    for ratio in ratios:
        comp = LatentCompressor(
            LatentConfig(**{**model.config.to_dict(), "ratio": ratio}), encoder=model.compressor.encoder, tokenizer=model.compressor.tokenizer
        )
        latents_by_ratio[ratio] = comp.compress(passages)

    # warm-up: an engine's first call pays one-off costs (vLLM compiles its graphs), not the prompt's
    dec.generate_from_segments([dec.qa_segments(question, passages[:1])], max_new_tokens=2)
    rows = []
    for k in ks:
        modes = [("text", passages[:k])] + [(f"latent 1:{r}", latents_by_ratio[r][:k]) for r in ratios]
        for mode, slots in modes:
            segments = dec.qa_segments(question, slots)
            positions = sum(s.positions for s in segments)
            with PeakRSS() as rss:
                ttft = median_seconds(lambda: dec.generate_from_segments([segments], max_new_tokens=1), repeats)
                total = median_seconds(lambda: dec.generate_from_segments([segments], max_new_tokens=new_tokens, min_new_tokens=new_tokens),
                               max(1, repeats - 1))
            rows.append({"k": k, "mode": mode, "prompt_positions": positions, "ttft_s": round(ttft, 4),
                         f"total_{new_tokens}_tokens_s": round(total, 3),
                         "kv_cache_mb": round((positions + new_tokens) * kv_bytes_per_position / 2**20, 1),
                         "peak_rss_mb": round(rss.peak_bytes / 2**20)})
    return rows


def plot_ttft_vs_k(rows: list[dict], png_path: str | Path) -> None:
    """Time to first token and end-to-end latency against the number of passages, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total_key = next(k for k in rows[0] if k.startswith("total_"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "ttft_s", "time to first token"), (axes[1], total_key, total_key.replace("_", " ").replace(" s", " (s)"))):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            pts = [(r["k"], r[key]) for r in rows if r["mode"] == mode]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("passages in the prompt (k, 128 tokens each)")
        ax.set_ylabel("seconds")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def run_core_benchmark(checkpoint: str | None = None, quick: bool = False, output: str | None = None) -> dict:
    from lclm_rag.model import load_model

    model = load_model(checkpoint)
    if quick:
        compression = bench_compression(model.config.encoder, [model.config.encoder_layers], [4], [1, 4], n=8)
        ttft = bench_ttft(model, [1, 2], [4], repeats=1, new_tokens=4)
    else:
        compression = bench_compression(model.config.encoder, [None, model.config.encoder_layers], [4, 8, 16], [1, 8, 32], n=64)
        ttft = bench_ttft(model, [1, 2, 4, 8, 10, 16, 32], [4, 8, 16])
    result = {"machine": machine_info(), "compression": compression, "ttft": ttft}
    by = {(r["k"], r["mode"]): r["ttft_s"] for r in ttft}
    k_max = max(r["k"] for r in ttft)
    result["summary"] = {
        "machine": result["machine"],
        f"ttft_text_k{k_max}_s": by[(k_max, "text")],
        **{f"ttft_{m.replace(' ', '_')}_k{k_max}_s": v for (k, m), v in by.items() if k == k_max and m != "text"},
        "best_passages_per_s": max(r["passages_per_s"] for r in compression),
    }
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2))
        Path(output).with_suffix(".md").write_text(
            f"Measured {result['machine']['date']} on {result['machine']['cores']} cores "
            f"({result['machine']['cpu']}, torch {result['machine']['torch']}).\n\n"
            "### Compression\n\n" + markdown_table(compression) + "\n\n### Time to first token and latency against k\n\n"
            + markdown_table(ttft) + "\n"
        )
        plot_ttft_vs_k(ttft, Path(output).with_name("ttft_vs_k.png"))
    return result


def _stored_passages(texts, vectors, latents, start: int = 0):
    from lclm_rag.store import StoredPassage, point_id

    return [
        StoredPassage(point_id("bench", start + i, str(start + i)), t, {"doc_id": f"bench-{(start + i) // 10}", "chunk_index": start + i},
                      dense=v, latents=lat)
        for i, (t, v, lat) in enumerate(zip(texts, vectors, latents))
    ]


def run_ingest_benchmark(n: int = 10_000, component_n: int = 1_000, workdir: str | None = None, output: str | None = None) -> dict:
    """Ingestion passages/s (embed, compress, store separately and together) and disk bytes/passage."""
    import tempfile

    from lclm_rag.embedding import Embedder
    from lclm_rag.ingest import Ingestor
    from lclm_rag.model import load_compressor
    from lclm_rag.store import CollectionSpec, LatentStore, directory_bytes

    work = Path(workdir or tempfile.mkdtemp(prefix="lclm-bench-"))
    compressor = load_compressor()
    embedder = Embedder()
    passages = sample_passages(compressor.tokenizer, n)
    sub = passages[:component_n]
    rows = []

    t = time.perf_counter()
    vectors = embedder.embed(sub)
    rows.append({"stage": "embed (all-MiniLM-L6-v2)", "passages": component_n, "passages_per_s": round(component_n / (time.perf_counter() - t), 1)})
    latents_by_ratio = {}
    for ratio in (4, 8, 16):
        comp = LatentCompressor(LatentConfig(**{**compressor.config.to_dict(), "ratio": ratio}), encoder=compressor.encoder, tokenizer=compressor.tokenizer).eval()
        t = time.perf_counter()
        latents_by_ratio[ratio] = (comp, comp.compress(sub, batch_size=32))
        rows.append({"stage": f"compress 1:{ratio} ({comp.config.encoder_layers}-layer encoder)", "passages": component_n,
                     "passages_per_s": round(component_n / (time.perf_counter() - t), 1)})

    storage = []
    for backend, ratio, latent_dtype in [(b, r, d) for b in ("edge", "qdrant-local") for r in latents_by_ratio for d in ("float16", "uint8")]:
        comp, latents = latents_by_ratio[ratio]
        spec = CollectionSpec(comp.fingerprint(), ratio, comp.config.encoder_hidden_size, embedder.name, embedder.dim,
                              latent_dtype=latent_dtype)
        path = work / f"{backend}-r{ratio}-{latent_dtype}"
        store = LatentStore.open("bench", path=path, backend="edge" if backend == "edge" else "qdrant")
        store.bind(spec)
        items = _stored_passages(sub, vectors, latents)
        t = time.perf_counter()
        for b in range(0, len(items), 64):
            store.upsert(items[b : b + 64])
        seconds = time.perf_counter() - t
        store.close()
        size = directory_bytes(path)
        storage.append({"backend": backend, "ratio": ratio, "latent_dtype": latent_dtype, "passages": component_n,
                        "store_passages_per_s": round(component_n / seconds, 1),
                        "disk_bytes_per_passage": int(size / component_n), "latent_values_per_passage": round(sum(z.numel() for z in latents) / component_n)})
        if ratio == 4 and latent_dtype == "float16":
            rows.append({"stage": f"store ({backend}, 1:4)", "passages": component_n, "passages_per_s": round(component_n / seconds, 1)})

    docs = work / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(passages)))
    with LatentStore.open("bench-e2e", path=work / "e2e") as store:
        ingestor = Ingestor(store, compressor, embedder, chunk_tokens=160, overlap=0, batch_size=64)
        report = ingestor.ingest_paths([docs], progress=False)
    rows.append({"stage": f"together: lclm-rag ingest (edge, 1:{compressor.config.ratio})", "passages": report.written,
                 "passages_per_s": round(report.written / report.seconds, 1)})
    result = {"machine": machine_info(), "throughput": rows, "storage": storage}
    if output:
        Path(output).write_text(json.dumps(result, indent=2))
        Path(output).with_suffix(".md").write_text(
            f"Measured {result['machine']['date']} on {result['machine']['cores']} cores.\n\n### Ingestion throughput\n\n"
            + markdown_table(rows) + "\n\n### Storage per passage (128-token passages)\n\n" + markdown_table(storage) + "\n"
        )
    return result


def run_query_benchmark(docs: str | Path | None = None, top_k: int = 5, repeats: int = 3, output: str | None = None,
                        checkpoint: str | None = None) -> dict:
    """End-to-end LatentQueryEngine latency on a small collection: all passages as latents vs all
    expanded to text (plain full-text RAG with the same decoder and retrieval)."""
    import tempfile

    from lclm_rag.embedding import Embedder
    from lclm_rag.ingest import Ingestor
    from lclm_rag.integrations.llama_index import LatentQueryEngine, LatentRetriever
    from lclm_rag.model import load_model
    from lclm_rag.store import LatentStore

    docs = Path(docs or REPO_ROOT / "examples" / "docs")
    questions = ["Who is the Eiffel Tower named after?", "Where does photosynthesis take place in plants?",
                 "When did Apollo 11 land on the Moon?", "How many species of fish live on the Great Barrier Reef?"]
    model, embedder = load_model(checkpoint), Embedder()
    rows = []
    with LatentStore.open("bench-query", path=Path(tempfile.mkdtemp()) / "q") as store:
        Ingestor(store, model.compressor, embedder).ingest_paths([docs], progress=False)
        k = min(top_k, store.count())
        retriever = LatentRetriever(store, embedder, similarity_top_k=k)
        for mode, expand in ((f"latents 1:{model.config.ratio}", 0), ("full text", k)):
            engine = LatentQueryEngine.from_args(retriever=retriever, model=model, expand=expand, max_new_tokens=32, streaming=True)
            engine.query(questions[0]).get_response()  # warm-up
            ttft, total, positions, words = [], [], [], []
            for _ in range(repeats):
                for question in questions:
                    t = time.perf_counter()
                    response = engine.query(question)
                    pieces = iter(response.response_gen)
                    first = next(pieces, "")
                    ttft.append(time.perf_counter() - t)
                    text = first + "".join(pieces)
                    total.append(time.perf_counter() - t)
                    positions.append(response.metadata["prompt_positions"])
                    words.append(len(text.split()))
            rows.append({"mode": mode, "top_k": k, "prompt_positions": round(statistics.mean(positions)),
                         "ttft_s": round(statistics.median(ttft), 3), "total_s": round(statistics.median(total), 3),
                         "answer_words": round(statistics.mean(words), 1)})
    result = {"machine": machine_info(), "collection": str(docs), "max_new_tokens": 32, "rows": rows}
    if output:
        Path(output).write_text(json.dumps(result, indent=2))
    return result
