"""Decode engines side by side in one run: transformers against vLLM (prefix caching off and on),
text against latents, the same prompts for every engine.

Per engine: ``bench_ttft`` against k (time to first token, total time for a fixed answer length),
and the throughput of one batch of questions, each with its own k passages (no prefix shared
between questions), all answered in one ``generate`` call.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Sequence
from pathlib import Path

from lclm_rag.compressor import LatentCompressor
from lclm_rag.config import LatentConfig
from lclm_rag.evaluation.bench import bench_ttft, sample_passages
from lclm_rag.evaluation.measure import machine_info, markdown_table

QUESTION = "What is the main topic of these passages?"


def engine_settings(engines: Sequence[str], prefix_caching: Sequence[bool]) -> list[tuple[str, str, dict]]:
    """(label, engine, engine kwargs) for every configuration to measure."""
    out = []
    for engine in engines:
        if engine == "vllm":
            out += [(f"vllm (prefix caching {'on' if on else 'off'})", "vllm", {"enable_prefix_caching": on}) for on in prefix_caching]
        else:
            out.append((engine, engine, {}))
    return out


def bench_batch(model, slots_per_question: dict[str, list[list]], new_tokens: int) -> list[dict]:
    """One ``generate`` call per mode over every question; questions answered per second."""
    dec = model.decoder
    rows = []
    for mode, slots in slots_per_question.items():
        prompts = [dec.qa_segments(QUESTION, s) for s in slots]
        dec.generate_from_segments(prompts[:2], max_new_tokens=2)  # warm-up: allocations, lazy initialisation
        start = time.perf_counter()
        dec.generate_from_segments(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        seconds = time.perf_counter() - start
        rows.append({"mode": mode, "questions": len(prompts), "k": len(slots[0]),
                     "prompt_positions_mean": round(sum(sum(s.positions for s in p) for p in prompts) / len(prompts), 1),
                     "seconds": round(seconds, 2), "questions_per_s": round(len(prompts) / seconds, 3),
                     "new_tokens_per_s": round(len(prompts) * new_tokens / seconds, 1)})
    text = next(r for r in rows if r["mode"] == "text")
    for r in rows:
        r["throughput_vs_text"] = round(r["questions_per_s"] / text["questions_per_s"], 2)
    return rows


def run_engine_benchmark(model=None, engines: Sequence[str] = ("hf", "vllm"), ks: Sequence[int] = (1, 2, 4, 8, 10, 16, 32),
                         ratios: Sequence[int] = (4, 8), batch: int = 32, batch_k: int = 10, new_tokens: int = 32,
                         prefix_caching: Sequence[bool] = (False, True), repeats: int = 2,
                         output: str | Path | None = None) -> dict:
    """``model``: a loaded ``LatentContextModel``, a checkpoint name or path, or None (the packaged
    default). Its engine is switched per configuration and put back to ``hf`` at the end."""
    from lclm_rag.model import LatentContextModel, load_model

    model = model if isinstance(model, LatentContextModel) else load_model(model)
    passages = sample_passages(model.compressor.tokenizer, batch * batch_k)
    groups = [passages[i * batch_k:(i + 1) * batch_k] for i in range(batch)]
    if len(groups[-1]) < batch_k:
        raise RuntimeError(f"need {batch * batch_k} benchmark passages, found {len(passages)}")
    slots = {"text": groups}
    for ratio in ratios:
        comp = LatentCompressor(LatentConfig(**{**model.config.to_dict(), "ratio": ratio}), encoder=model.compressor.encoder,
                                tokenizer=model.compressor.tokenizer).eval()
        latents = comp.compress(passages)
        slots[f"latent 1:{ratio}"] = [latents[i * batch_k:(i + 1) * batch_k] for i in range(batch)]
    ttft, throughput = [], []
    try:
        for label, engine, kwargs in engine_settings(engines, prefix_caching):
            model.use_engine(engine, **kwargs)
            ttft += [{"engine": label, **r} for r in bench_ttft(model, list(ks), list(ratios), repeats, new_tokens)]
            throughput += [{"engine": label, **r} for r in bench_batch(model, slots, new_tokens)]
            model.use_engine("hf")  # drop the engine before the next one starts
            gc.collect()
    finally:
        model.use_engine("hf")
    result = {"machine": machine_info(), "new_tokens": new_tokens, "ttft": ttft, "throughput": throughput}
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2))
        Path(output).with_suffix(".md").write_text(
            f"Measured {result['machine']['date']} on {result['machine']['cores']} cores.\n\n"
            f"### Time to first token and total time for {new_tokens} new tokens against k\n\n" + markdown_table(ttft)
            + f"\n\n### Throughput: {batch} questions, {batch_k} passages each, one generate call\n\n"
            + markdown_table(throughput) + "\n")
    return result
