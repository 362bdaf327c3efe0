"""Where prompt embeddings are decoded: transformers in this process, vLLM in this process, or a
vLLM server.

The latent decoder builds one (positions, hidden) tensor per prompt (text embeddings, boundary
embeddings and projected latents) and hands the batch to an engine. Every engine gets the same
tensors and the same `GenerationSettings`, so greedy answers agree across engines up to the
engines' own arithmetic. vLLM serves a *serving copy* of the decoder: its LoRA merged into the
base weights, written once under ``$LCLM_RAG_HOME/serving/<decoder fingerprint>`` (the copy a
``vllm serve`` for `RemoteVLLMEngine` loads too).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lclm_rag.errors import ConfigError, EngineError, InputError

logger = logging.getLogger(__name__)
ENGINES = ("hf", "vllm")
LatentDecoder = Any  # lclm_rag.decoder.LatentDecoder, which builds its engine (importing it here would be a cycle)


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings every engine honours (sampling ones only with ``do_sample``)."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int | None = None
    repetition_penalty: float | None = None  # None: the engine's default (no penalty); LCLM's HF path uses 1.1
    min_new_tokens: int = 0  # EOS is suppressed until then (benchmarks time a fixed answer length)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be positive, got {self.repetition_penalty}")


class DecodeEngine(ABC):
    """Decodes a batch of prompt embeddings into the new text of each prompt."""

    name: str

    @abstractmethod
    def generate(self, prompts: Sequence[torch.Tensor], settings: GenerationSettings) -> list[str]: ...

    def stream(self, prompt: torch.Tensor, settings: GenerationSettings) -> Iterator[str]:
        """Text pieces as they are decoded (engines without streaming yield the whole answer once)."""
        yield from self.generate([prompt], settings)

    def timed(self, prompt: torch.Tensor, settings: GenerationSettings) -> tuple[str, float]:
        """The answer and the ``perf_counter`` time its first piece arrived (time to first token)."""
        first, pieces = None, []
        for piece in self.stream(prompt, settings):
            first = first or time.perf_counter()
            pieces.append(piece)
        return "".join(pieces).strip(), first or time.perf_counter()


class _FirstTokenTimer:
    """A ``generate`` streamer that only notes when the first new token arrives."""

    def __init__(self) -> None:
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1  # call 1 is the prompt, call 2 the first generated token
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()


class HFEngine(DecodeEngine):
    """``transformers`` ``generate`` on the decoder itself (LoRA active): the reference engine."""

    name = "hf"

    def __init__(self, decoder: "LatentDecoder") -> None:
        self.decoder = decoder

    def _kwargs(self, s: GenerationSettings) -> dict[str, Any]:
        tok = self.decoder.tokenizer
        kwargs = dict(max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens, do_sample=s.do_sample,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True,
                      repetition_penalty=s.repetition_penalty)
        if s.do_sample:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        else:  # silence "temperature is set but do_sample=False" from a model's generation_config
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    @torch.no_grad()
    def generate(self, prompts: Sequence[torch.Tensor], settings: GenerationSettings, streamer=None) -> list[str]:
        embeds, mask = self.decoder.pad_batch(list(prompts))
        out = self.decoder.model.generate(inputs_embeds=embeds, attention_mask=mask, streamer=streamer, **self._kwargs(settings))
        return [t.strip() for t in self.decoder.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def timed(self, prompt: torch.Tensor, settings: GenerationSettings) -> tuple[str, float]:
        timer = _FirstTokenTimer()  # the first token itself, not the first whole word a text streamer waits for
        text = self.generate([prompt], settings, streamer=timer)[0]
        return text, timer.first

    def stream(self, prompt: torch.Tensor, settings: GenerationSettings) -> Iterator[str]:
        """TextIteratorStreamer fed by ``generate`` in a worker thread; worker errors reach the caller."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.decoder.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.generate([prompt], settings, streamer=streamer)
            except BaseException as exc:
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if errors:
            raise errors[0]


def serving_copy(decoder: "LatentDecoder", home: str | Path | None = None) -> Path:
    """The decoder with its LoRA merged, saved as a plain HF model directory (written once).

    Keyed by the decoder-side fingerprint, so a retrained LoRA gets a new copy. Input embeddings
    are untouched by the merge (LoRA targets the projections), so the prompt embeddings the latent
    decoder builds are the ones the copy expects.
    """
    from lclm_rag.hub import lclm_home

    root = Path(home) if home is not None else lclm_home() / "serving"
    target = root / f"decoder-{decoder.fingerprint()[:16]}"
    if (target / "config.json").is_file():
        return target
    import copy

    model = copy.deepcopy(decoder.model)
    if hasattr(model, "merge_and_unload"):  # a peft model: fold the adapters into the weights
        model = model.merge_and_unload()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    decoder.tokenizer.save_pretrained(partial)
    partial.rename(target)
    logger.info("wrote the decoder's serving copy to %s", target)
    return target


def _sampling_params(settings: GenerationSettings) -> dict[str, Any]:
    """vLLM ``SamplingParams`` / completions fields equal to the HF settings (greedy is temperature 0)."""
    params: dict[str, Any] = {"max_tokens": settings.max_new_tokens, "min_tokens": settings.min_new_tokens,
                              "repetition_penalty": settings.repetition_penalty or 1.0}
    if settings.do_sample:
        params.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or -1)
    else:
        params.update(temperature=0.0)
    return params


class VLLMEngine(DecodeEngine):
    """vLLM in this process (``LLM(..., enable_prompt_embeds=True)``) on the decoder's serving copy.

    vLLM starts worker processes: scripts that use it need an ``if __name__ == "__main__":`` guard.
    ``llm_kwargs`` go to ``vllm.LLM`` (e.g. ``enable_prefix_caching``, ``tensor_parallel_size``,
    ``gpu_memory_utilization``); on CPU the KV cache defaults to 2 GiB (``VLLM_CPU_KVCACHE_SPACE``) and
    the model runs eager (``enforce_eager=False`` compiles it: minutes at start, faster steps).
    """

    name = "vllm"

    def __init__(self, decoder: "LatentDecoder", **llm_kwargs: Any) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise EngineError(f"the vllm engine needs vLLM ({exc}): pip install 'lclm-rag[vllm]'") from exc
        on_cpu = decoder.device.type == "cpu"
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        self.dtype = decoder.model.get_input_embeddings().weight.dtype
        # eager on CPU: compiling the graph there takes minutes at every start (measured: 275 s vs 14 s)
        kwargs = {"dtype": str(self.dtype).removeprefix("torch."), "enable_prompt_embeds": True, "enforce_eager": on_cpu,
                  "enable_prefix_caching": False, "max_model_len": decoder.max_positions or 2048, **llm_kwargs}
        self.prefix_caching = bool(kwargs["enable_prefix_caching"])
        self.decoder, self._kwargs, self._llm = decoder, kwargs, None
        self._reference = HFEngine(decoder)

    @property
    def llm(self):
        """The vLLM engine on the serving copy, started at first use."""
        if self._llm is None:
            from vllm import LLM

            self._llm = LLM(model=str(serving_copy(self.decoder)), **self._kwargs)
        return self._llm

    def _base_mode(self) -> bool:
        """Inside ``decoder.base()`` the merged copy is the wrong model: decode on transformers instead."""
        if getattr(self.decoder, "base_active", False):
            if not getattr(self, "_warned_base", False):
                logger.warning("the vllm engine serves the adapted decoder; base-decoder prompts decode on transformers")
                self._warned_base = True
            return True
        return False

    def _params(self, settings: GenerationSettings, **extra: Any):
        from vllm import SamplingParams

        return SamplingParams(**_sampling_params(settings), **extra)

    def _inputs(self, prompts: Sequence[torch.Tensor]) -> list[dict]:
        return [{"prompt_embeds": p.detach().to("cpu", self.dtype)} for p in prompts]

    def generate(self, prompts: Sequence[torch.Tensor], settings: GenerationSettings) -> list[str]:
        if self._base_mode():
            return self._reference.generate(prompts, settings)
        outputs = self.llm.generate(self._inputs(prompts), self._params(settings), use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]

    def stream(self, prompt: torch.Tensor, settings: GenerationSettings) -> Iterator[str]:
        """Steps the engine and yields each step's new text (``RequestOutputKind.DELTA``)."""
        from vllm.sampling_params import RequestOutputKind

        if self._base_mode():
            yield from self._reference.stream(prompt, settings)
            return

        engine = self.llm.llm_engine
        request_id = f"lclm-{id(prompt)}-{threading.get_ident()}"
        engine.add_request(request_id, self._inputs([prompt])[0], self._params(settings, output_kind=RequestOutputKind.DELTA))
        started = False
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != request_id or not out.outputs:
                    continue
                piece = out.outputs[0].text
                if not started:
                    piece, started = piece.lstrip(), bool(piece.strip())
                if piece:
                    yield piece


class RemoteVLLMEngine(DecodeEngine):
    """A ``vllm serve <serving copy> --enable-prompt-embeds`` server, through its completions API.

    Prompt embeddings travel base64-encoded (``torch.save`` bytes), the format vLLM's server reads.
    Many query front ends can share one GPU server this way.
    """

    name = "vllm-server"

    def __init__(self, url: str, model: str | None = None, dtype: torch.dtype = torch.float32, timeout: float = 300.0,
                 expected_fingerprint: str | None = None) -> None:
        import httpx

        if not url.startswith(("http://", "https://")):
            raise InputError(f"decoder url {url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)")
        self.url, self.dtype = url.rstrip("/"), dtype
        self.client = httpx.Client(timeout=timeout)
        try:
            models = self.client.get(f"{self.url}/models").raise_for_status().json()["data"]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise EngineError(f"no vLLM server answers at {self.url} ({exc}); start one with "
                                     "`vllm serve <serving copy> --enable-prompt-embeds`") from exc
        served = [m["id"] for m in models]
        if model is None and not served:
            raise EngineError(f"the vLLM server at {self.url} serves no model")
        self.model = model or served[0]
        if expected_fingerprint and expected_fingerprint[:16] not in self.model:
            logger.warning("the vLLM server at %s serves %s, not this decoder's serving copy (decoder-%s): answers "
                           "come from whatever weights it loaded", self.url, self.model, expected_fingerprint[:16])

    @staticmethod
    def encode(prompt: torch.Tensor, dtype: torch.dtype) -> str:
        buffer = io.BytesIO()
        torch.save(prompt.detach().to("cpu", dtype).contiguous(), buffer)
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def _body(self, prompt: torch.Tensor, settings: GenerationSettings, stream: bool) -> dict[str, Any]:
        return {"model": self.model, "prompt_embeds": self.encode(prompt, self.dtype), "stream": stream,
                **_sampling_params(settings)}

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        try:
            return self.client.post(f"{self.url}/completions", json=body).raise_for_status().json()
        except httpx.HTTPStatusError as exc:
            raise EngineError(f"the vLLM server at {self.url} refused the request: {exc.response.text[:300]}") from exc
        except httpx.HTTPError as exc:
            raise EngineError(f"the vLLM server at {self.url} did not answer: {exc}") from exc

    def generate(self, prompts: Sequence[torch.Tensor], settings: GenerationSettings) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(16, len(prompts)) or 1) as pool:  # the server batches concurrent requests
            replies = list(pool.map(lambda p: self._post(self._body(p, settings, stream=False)), prompts))
        return [r["choices"][0]["text"].strip() for r in replies]

    def stream(self, prompt: torch.Tensor, settings: GenerationSettings) -> Iterator[str]:
        with self.client.stream("POST", f"{self.url}/completions", json=self._body(prompt, settings, stream=True)) as reply:
            if reply.status_code != 200:
                raise EngineError(f"the vLLM server at {self.url} refused the request: {reply.read()[:300]!r}")
            started = False
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                piece = json.loads(line[6:])["choices"][0]["text"]
                if not started:
                    piece, started = piece.lstrip(), bool(piece.strip())
                if piece:
                    yield piece


def make_engine(decoder: "LatentDecoder", engine: str | DecodeEngine = "hf", *, url: str | None = None,
                **engine_kwargs: Any) -> DecodeEngine:
    """An engine by name (``hf`` | ``vllm``), a server when ``url`` is given, or an engine object as is."""
    if isinstance(engine, DecodeEngine):
        return engine
    if url is not None:
        return RemoteVLLMEngine(url, dtype=decoder.model.get_input_embeddings().weight.dtype,
                                expected_fingerprint=decoder.fingerprint(), **engine_kwargs)
    if engine == "hf":
        return HFEngine(decoder)
    if engine == "vllm":
        return VLLMEngine(decoder, **engine_kwargs)
    raise ConfigError(f"unknown decode engine {engine!r} (known: {', '.join(ENGINES)})")


__all__ = ["DecodeEngine", "GenerationSettings", "HFEngine", "RemoteVLLMEngine", "VLLMEngine", "make_engine",
           "serving_copy"]
