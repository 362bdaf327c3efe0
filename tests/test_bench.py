from lclm_rag.evaluation.bench import bench_ttft, plot_ttft_vs_k, sample_passages
from lclm_rag.evaluation.measure import PeakRSS, markdown_table


def test_ttft_rows_compare_text_and_latents(model, tmp_path):
    rows = bench_ttft(model, ks=[1, 2], ratios=[4, 8], repeats=1, new_tokens=3)
    by_mode = {(r["k"], r["mode"]): r for r in rows}
    assert set(by_mode) == {(k, m) for k in (1, 2) for m in ("text", "latent 1:4", "latent 1:8")}
    assert by_mode[2, "latent 1:8"]["prompt_positions"] < by_mode[2, "latent 1:4"]["prompt_positions"] < by_mode[2, "text"]["prompt_positions"]
    assert by_mode[2, "latent 1:4"]["kv_cache_mb"] < by_mode[2, "text"]["kv_cache_mb"]
    assert all(r["ttft_s"] > 0 and r["total_3_tokens_s"] > 0 and r["peak_rss_mb"] > 100 for r in rows)
    assert markdown_table(rows).count("\n") == len(rows) + 1
    plot_ttft_vs_k(rows, tmp_path / "ttft.png")
    assert (tmp_path / "ttft.png").stat().st_size > 10_000


def test_peak_rss_sees_a_short_allocation():
    import numpy as np

    with PeakRSS() as before:
        pass
    with PeakRSS() as during:
        block = np.ones(200 * 2**20 // 8)  # 200 MB, touched
        block.sum()
        del block
    assert during.peak_bytes - before.peak_bytes > 150 * 2**20


def test_sample_passages_have_the_requested_length(model):
    tok = model.compressor.tokenizer
    ps = sample_passages(tok, 3, tokens=64)
    assert len(ps) == 3 and all(60 <= len(tok(p, add_special_tokens=False)["input_ids"]) <= 68 for p in ps)
