"""Decode engines side by side in one run: transformers against vLLM (prefix caching off and on),
text against latents, the same prompts for every engine; and a vLLM server sent whole prompts as
embeddings against token ids and latents (``vllm-server``).

Per engine: ``bench_ttft`` against k (time to first token, total time for a fixed answer length),
and the throughput of one batch of questions, each with its own k passages (no prefix shared
between questions), all answered in one ``generate`` call. For the server: request bytes and time
to first token of both paths on the same prompts, first seen and repeated, prefix caching on.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
        if engine == "vllm-server":
            continue  # `bench_server`: its own server, not an engine of this process
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


@contextmanager
def vllm_server(model_dir: Path, log: Path, python: str | Path = sys.executable,
                env: dict[str, str] | None = None) -> Iterator[str]:
    """``vllm serve`` (``python``'s vLLM, by default this environment's) on ``model_dir`` at
    127.0.0.1, with the serving copy's prompt template and prefix caching; its ``/v1`` URL while it runs."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port), "--enable-prompt-embeds", "--chat-template", str(model_dir / "lclm_rag_prompt.jinja"),
            "--enable-prefix-caching", "--dtype", "float32", "--max-model-len", "4096", "--enforce-eager"]
    if env is None:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
    try:
        deadline = time.time() + 900
        while True:
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the vLLM server did not start: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(timeout=120)


def bench_server(model, url: str, groups: list[list[str]], latents: list[list], new_tokens: int, expand: int = 1) -> list[dict]:
    """Both server paths on the same prompts (``QUESTION`` over each group's passages, the first
    ``expand`` as text, the rest as latents): request bytes, and time to first token when a prompt
    is first seen (only the shared template can come from the prefix cache) and repeated."""
    from lclm_rag.engine import GenerationSettings, RemoteVLLMEngine, make_engine

    dec = model.decoder
    prompts = [dec.embed(dec.qa_segments(QUESTION, list(g[:expand]) + list(lat[expand:]))).detach() for g, lat in zip(groups, latents)]
    mixed = make_engine(dec, url=url)
    paths = {"whole prompt as embeddings": RemoteVLLMEngine(url, dtype=mixed.dtype, tokens=mixed.tokens, mixed=False),
             "token ids + latents": mixed}
    settings, rows, answers = GenerationSettings(max_new_tokens=new_tokens), [], {}
    for label, engine in paths.items():
        engine.generate([dec.embed(dec.qa_segments("Warm-up?", ["A warm-up passage."])).detach()], settings)
        sizes = [len(json.dumps(engine.request_body(p, settings, stream=True)[1]).encode()) for p in prompts]
        passes = []
        for _ in range(2):  # first seen, then repeated
            ttft, texts = [], []
            for p in prompts:
                start = time.perf_counter()
                text, first = engine.timed(p, settings)
                ttft.append(first - start)
                texts.append(text)
            passes.append(ttft)
        answers[label] = texts
        rows.append({"path": label, "mixed": engine.mixed, "questions": len(prompts), "k": len(groups[0]), "expanded": expand,
                     "prompt_positions_mean": round(statistics.mean(len(p) for p in prompts), 1),
                     "request_bytes_mean": round(statistics.mean(sizes)), "ttft_first_s_mean": round(statistics.mean(passes[0]), 3),
                     "ttft_first_s_median": round(statistics.median(passes[0]), 3), "ttft_repeat_s_mean": round(statistics.mean(passes[1]), 3)})
    same = len(set(map(tuple, answers.values()))) == 1
    for r in rows:
        r["same_answers"] = same
    return rows


def run_engine_benchmark(model=None, engines: Sequence[str] = ("hf", "vllm"), ks: Sequence[int] = (1, 2, 4, 8, 10, 16, 32),
                         ratios: Sequence[int] = (4, 8), batch: int = 32, batch_k: int = 10, new_tokens: int = 32,
                         prefix_caching: Sequence[bool] = (False, True), repeats: int = 2, server_questions: int = 16,
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
    ttft, throughput, server = [], [], []
    if "vllm-server" in engines:
        from lclm_rag.engine import serving_copy

        out_dir = Path(output).parent if output else Path("runs/bench")
        out_dir.mkdir(parents=True, exist_ok=True)
        with vllm_server(serving_copy(model.decoder), out_dir / "vllm_server.log") as url:
            for k, expand in ((5, 1), (10, 0)):
                server += bench_server(model, url, [g[:k] for g in groups[:server_questions]],
                                       [lat[:k] for lat in slots[f"latent 1:{ratios[0]}"][:server_questions]], new_tokens, expand)
    try:
        for label, engine, kwargs in engine_settings(engines, prefix_caching):
            model.use_engine(engine, **kwargs)
            ttft += [{"engine": label, **r} for r in bench_ttft(model, list(ks), list(ratios), repeats, new_tokens)]
            throughput += [{"engine": label, **r} for r in bench_batch(model, slots, new_tokens)]
            model.use_engine("hf")  # drop the engine before the next one starts
            gc.collect()
    finally:
        model.use_engine("hf")
    result = {"machine": machine_info(), "new_tokens": new_tokens, "ttft": ttft, "throughput": throughput, "server": server}
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2))
        Path(output).with_suffix(".md").write_text(
            f"Measured {result['machine']['date']} on {result['machine']['cores']} cores.\n\n"
            f"### Time to first token and total time for {new_tokens} new tokens against k\n\n" + markdown_table(ttft)
            + f"\n\n### Throughput: {batch} questions, {batch_k} passages each, one generate call\n\n"
            + markdown_table(throughput) + "\n"
            + ("\n### vLLM server: whole prompts as embeddings against token ids and latents, prefix caching on\n\n"
               + markdown_table(server) + "\n" if server else ""))
    return result
