from lclm_rag.bench import bench_ttft, markdown_table, sample_passages


def test_ttft_rows_compare_text_and_latents(model):
    rows = bench_ttft(model, ks=[2], ratios=[4], repeats=1)
    by_mode = {r["mode"]: r for r in rows}
    assert set(by_mode) == {"text", "latent 1:4"}
    assert by_mode["latent 1:4"]["prompt_positions"] < by_mode["text"]["prompt_positions"]
    assert all(r["ttft_s"] > 0 for r in rows)
    assert markdown_table(rows).count("\n") == 3


def test_sample_passages_have_the_requested_length(model):
    tok = model.compressor.tokenizer
    ps = sample_passages(tok, 3, tokens=64)
    assert len(ps) == 3 and all(60 <= len(tok(p, add_special_tokens=False)["input_ids"]) <= 68 for p in ps)
