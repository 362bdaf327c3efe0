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
from typing import Any, Protocol

import torch

from lclm_rag.errors import ConfigError, EngineError, InputError
from lclm_rag.serving import PROMPT_TEMPLATE, TEMPLATE_FILE, TokenTable, encode_embeds, mixed_prompts_refusal

logger = logging.getLogger(__name__)
ENGINES = ("hf", "vllm")


class EngineDecoder(Protocol):
    """What an engine reads of the decoder that owns it (`lclm_rag.decoder.LatentDecoder` builds its
    engine, so the engine names this interface instead of importing the decoder back)."""

    model: Any  # the causal LM (with its LoRA, if any)
    tokenizer: Any
    base_active: bool  # inside ``LatentDecoder.base()``: decode on the base LM

    @property
    def device(self) -> torch.device: ...

    @property
    def max_positions(self) -> int | None: ...

    def pad_batch(self, prompts: Sequence[torch.Tensor], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]: ...

    def fingerprint(self) -> str: ...


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


@dataclass(frozen=True)
class PrefillCost:
    """Time to first token as ``fixed_s + per_position_s * positions`` on one engine (`lclm_rag.planning.prefill_cost`)."""

    fixed_s: float
    per_position_s: float

    def positions_within(self, seconds: float) -> int:
        return max(0, int((seconds - self.fixed_s) / self.per_position_s))


class DecodeEngine(ABC):
    """Decodes a batch of prompt embeddings into the new text of each prompt."""

    name: str
    prefill_cost: PrefillCost | None = None  # measured at the first latency budget, kept with the engine it measures

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

    def __init__(self, decoder: EngineDecoder) -> None:
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


def serving_copy(decoder: EngineDecoder, home: str | Path | None = None) -> Path:
    """The decoder with its LoRA merged, saved as a plain HF model directory (written once).

    Keyed by the decoder-side fingerprint, so a retrained LoRA gets a new copy. Input embeddings
    are untouched by the merge (LoRA targets the projections), so the prompt embeddings the latent
    decoder builds are the ones the copy expects. The copy carries `lclm_rag.serving.TEMPLATE_FILE`,
    the chat template a server needs to take prompts as token ids and latents.
    """
    from lclm_rag.hub import lclm_home

    root = Path(home) if home is not None else lclm_home() / "serving"
    target = root / f"decoder-{decoder.fingerprint()[:16]}"
    if (target / "config.json").is_file():
        if not (target / TEMPLATE_FILE).is_file():  # a copy written before the template was
            (target / TEMPLATE_FILE).write_text(PROMPT_TEMPLATE + "\n")
        return target
    import copy

    model = copy.deepcopy(decoder.model)
    if hasattr(model, "merge_and_unload"):  # a peft model: fold the adapters into the weights
        model = model.merge_and_unload()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    decoder.tokenizer.save_pretrained(partial)
    (partial / TEMPLATE_FILE).write_text(PROMPT_TEMPLATE + "\n")  # how a server renders mixed prompts (lclm_rag.serving)
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

    def __init__(self, decoder: EngineDecoder, **llm_kwargs: Any) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise EngineError(f"the vllm engine needs vLLM ({exc}): run through .venv-vllm (scripts/setup.sh --vllm) "
                              "or pip install 'lclm-rag[vllm]'") from exc
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
    """A ``vllm serve <serving copy> --enable-prompt-embeds`` server.

    With ``tokens`` (the decoder's embedding table) and a server that renders chat messages with the
    serving copy's `lclm_rag.serving.TEMPLATE_FILE`, a prompt goes to ``/chat/completions`` as token
    ids for its text positions and embeddings for the rest; otherwise, said in one log line, the
    whole prompt goes to ``/completions`` as embeddings (base64 ``torch.save`` bytes, which vLLM
    loads with ``weights_only``). Many query front ends can share one GPU server this way.
    """

    name = "vllm-server"
    encode = staticmethod(encode_embeds)

    def __init__(self, url: str, model: str | None = None, dtype: torch.dtype = torch.float32, timeout: float = 300.0,
                 expected_fingerprint: str | None = None, tokens: TokenTable | None = None, mixed: bool = True) -> None:
        import httpx

        if not url.startswith(("http://", "https://")):
            raise InputError(f"decoder url {url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)")
        self.url, self.dtype, self.tokens = url.rstrip("/"), dtype, tokens
        self.client = httpx.Client(timeout=timeout)
        try:
            models = self.client.get(f"{self.url}/models").raise_for_status().json()["data"]
            served = [str(m["id"]) for m in models]
        except (httpx.HTTPError, KeyError, ValueError, TypeError) as exc:
            raise EngineError(f"no vLLM server answers at {self.url} ({exc or type(exc).__name__}); start one with "
                                     "`vllm serve <serving copy> --enable-prompt-embeds`") from exc
        if model is None and not served:
            raise EngineError(f"the vLLM server at {self.url} serves no model")
        self.model = model or served[0]
        if expected_fingerprint and expected_fingerprint[:16] not in self.model:
            logger.warning("the vLLM server at %s serves %s, not this decoder's serving copy (decoder-%s): answers "
                           "come from whatever weights it loaded", self.url, self.model, expected_fingerprint[:16])
        self.mixed, self.fallback, self._lock = mixed and tokens is not None, None, threading.Lock()
        if self.mixed and (why := mixed_prompts_refusal(self.client, self.url, self.model, tokens, dtype)):
            self._fall_back(why)

    def _fall_back(self, why: str) -> None:
        """Whole embeddings from now on, said once (``fallback`` keeps why)."""
        with self._lock:
            if self.fallback is None:
                self.fallback = why
                logger.warning("the vLLM server at %s %s: sending whole prompts as embeddings", self.url, why)
            self.mixed = False

    def request_body(self, prompt: torch.Tensor, settings: GenerationSettings, stream: bool) -> tuple[str, dict[str, Any]]:
        """The endpoint and request body for one prompt (mixed while the server takes it)."""
        if self.mixed:
            content = self.tokens.parts(prompt, self.dtype)
            return "/chat/completions", {"model": self.model, "messages": [{"role": "user", "content": content}],
                                         "stream": stream, **_sampling_params(settings)}
        return "/completions", {"model": self.model, "prompt_embeds": self.encode(prompt, self.dtype), "stream": stream,
                                **_sampling_params(settings)}

    def _post(self, prompt: torch.Tensor, settings: GenerationSettings) -> str:
        import httpx

        path, body = self.request_body(prompt, settings, stream=False)
        try:
            reply = self.client.post(f"{self.url}{path}", json=body)
            if reply.status_code == 400 and self.mixed:
                self._fall_back(f"refused a mixed prompt ({reply.text[:200]})")
                return self._post(prompt, settings)
            return self._text(reply.raise_for_status().json())
        except httpx.HTTPStatusError as exc:
            raise EngineError(f"the vLLM server at {self.url} refused the request: {exc.response.text[:300]}") from exc
        except httpx.HTTPError as exc:
            raise EngineError(f"the vLLM server at {self.url} did not answer: {exc or type(exc).__name__}") from exc
        except ValueError as exc:
            raise EngineError(f"the server at {self.url} answered with something that is not JSON ({exc})") from exc

    def generate(self, prompts: Sequence[torch.Tensor], settings: GenerationSettings) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(16, len(prompts)) or 1) as pool:  # the server batches concurrent requests
            return [text.strip() for text in pool.map(lambda p: self._post(p, settings), prompts)]

    def _text(self, reply: Any) -> str:
        """The new text of a completions or chat answer (or streamed event), or one clear error."""
        try:
            choice = reply["choices"][0]
            text = choice["text"] if "text" in choice else (choice.get("message") or choice.get("delta") or {}).get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise EngineError(f"the server at {self.url} answered without a completion (no choices[0].text): "
                              f"{json.dumps(reply)[:200]}; is it a vLLM server?") from None
        if not isinstance(text, str):
            raise EngineError(f"the server at {self.url} answered a completion whose text is {type(text).__name__}")
        return text

    def stream(self, prompt: torch.Tensor, settings: GenerationSettings) -> Iterator[str]:
        import httpx

        try:
            yield from self._stream(prompt, settings)
        except httpx.HTTPError as exc:
            raise EngineError(f"the vLLM server at {self.url} did not answer: {exc or type(exc).__name__}") from exc

    def _stream(self, prompt: torch.Tensor, settings: GenerationSettings) -> Iterator[str]:
        path, body = self.request_body(prompt, settings, stream=True)
        with self.client.stream("POST", f"{self.url}{path}", json=body) as reply:
            if reply.status_code == 400 and self.mixed:
                self._fall_back(f"refused a mixed prompt ({reply.read()[:200]!r})")
                yield from self._stream(prompt, settings)
                return
            if reply.status_code != 200:
                raise EngineError(f"the vLLM server at {self.url} refused the request: {reply.read()[:300]!r}")
            started = False
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                try:
                    event = json.loads(line[6:])
                except ValueError:
                    raise EngineError(f"the server at {self.url} streamed an event that is not JSON: {line[:200]!r}") from None
                piece = self._text(event)
                if not started:
                    piece, started = piece.lstrip(), bool(piece.strip())
                if piece:
                    yield piece


def make_engine(decoder: EngineDecoder, engine: str | DecodeEngine = "hf", *, url: str | None = None,
                **engine_kwargs: Any) -> DecodeEngine:
    """An engine by name (``hf`` | ``vllm``), a server when ``url`` is given, or an engine object as is."""
    if isinstance(engine, DecodeEngine):
        return engine
    if url is not None:
        table = decoder.model.get_input_embeddings().weight
        return RemoteVLLMEngine(url, dtype=table.dtype, expected_fingerprint=decoder.fingerprint(),
                                tokens=TokenTable(table, decoder.tokenizer), **engine_kwargs)
    if engine == "hf":
        return HFEngine(decoder)
    if engine == "vllm":
        return VLLMEngine(decoder, **engine_kwargs)
    raise ConfigError(f"unknown decode engine {engine!r} (known: {', '.join(ENGINES)})")


__all__ = ["DecodeEngine", "GenerationSettings", "HFEngine", "RemoteVLLMEngine", "VLLMEngine", "make_engine",
           "serving_copy"]
