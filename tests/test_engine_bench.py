from lclm_rag.evaluation.engine_bench import engine_settings, run_engine_benchmark


def test_engine_settings_measure_vllm_with_prefix_caching_off_and_on():
    assert engine_settings(["hf", "vllm"], [False, True]) == [
        ("hf", "hf", {}),
        ("vllm (prefix caching off)", "vllm", {"enable_prefix_caching": False}),
        ("vllm (prefix caching on)", "vllm", {"enable_prefix_caching": True}),
    ]


def test_one_run_reports_ttft_against_k_and_batch_throughput_per_engine(model, tmp_path):
    result = run_engine_benchmark(model, engines=["hf"], ks=[1, 2], ratios=[4], batch=3, batch_k=2, new_tokens=3, repeats=1,
                                  output=tmp_path / "engines.json")
    assert {(r["engine"], r["k"], r["mode"]) for r in result["ttft"]} == {("hf", k, m) for k in (1, 2) for m in ("text", "latent 1:4")}
    rows = {r["mode"]: r for r in result["throughput"]}
    assert set(rows) == {"text", "latent 1:4"} and all(r["questions"] == 3 and r["k"] == 2 for r in rows.values())
    assert rows["latent 1:4"]["prompt_positions_mean"] < rows["text"]["prompt_positions_mean"]
    assert rows["text"]["throughput_vs_text"] == 1.0 and rows["latent 1:4"]["questions_per_s"] > 0
    assert model.decoder.engine.name == "hf"
    assert "Throughput: 3 questions, 2 passages each" in (tmp_path / "engines.md").read_text()
