"""Decode engines: transformers in process (reference), vLLM in process and a vLLM server.

The vLLM tests run the example script in a subprocess (vLLM starts worker processes) on the
packaged checkpoint and the example documents, and compare every answer with the HF engine's.
vLLM lives in its own environment, ``.venv-vllm`` (`scripts/setup.sh --vllm`, part of the test
command): in process it runs the example there; the server runs there and is asked from here.
"""

import base64
import http.server
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lclm_rag.engine import GenerationSettings, HFEngine, RemoteVLLMEngine, make_engine, serving_copy
from lclm_rag.errors import ConfigError, EngineError, InputError
from lclm_rag.evaluation.engine_bench import vllm_server as start_vllm_server
from lclm_rag.serving import PROMPT_TEMPLATE

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "ingest_and_query.py"


def test_settings_are_checked():
    with pytest.raises(InputError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(InputError, match="repetition_penalty"):
        GenerationSettings(repetition_penalty=0)


def test_engine_choice_errors(model):
    assert isinstance(model.decoder.engine, HFEngine)
    with pytest.raises(ConfigError, match="unknown decode engine 'tgi'"):
        make_engine(model.decoder, "tgi")
    with pytest.raises(InputError, match="must start with http"):
        RemoteVLLMEngine("127.0.0.1:8000/v1")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EngineError, match=f"no vLLM server answers at http://127.0.0.1:{port}/v1"):
        model.use_engine("vllm", url=f"http://127.0.0.1:{port}/v1")
    assert isinstance(model.decoder.engine, HFEngine)  # a failed switch keeps the engine


def test_timed_answer_equals_the_answer_and_marks_its_first_token(model, passages):
    segments = model.decoder.qa_segments("Who designed the tower?", [model.compress(passages[:1])[0]])
    prompt = model.decoder.embed(segments).detach()
    before = time.perf_counter()
    text, first = model.decoder.engine.timed(prompt, GenerationSettings(max_new_tokens=12))
    assert text == model.decoder.generate_from_segments([segments], max_new_tokens=12)[0]
    assert before < first < time.perf_counter()


def test_prompt_embeddings_travel_as_vllms_base64_tensors():
    x = torch.randn(7, 16)
    data = base64.b64decode(RemoteVLLMEngine.encode(x, torch.float32))
    torch.testing.assert_close(torch.load(io.BytesIO(data), weights_only=True), x)
    rows = base64.b64decode(RemoteVLLMEngine.encode(x[2:4], torch.float32))  # a view travels as its rows alone
    torch.testing.assert_close(torch.load(io.BytesIO(rows), weights_only=True), x[2:4])
    assert len(rows) < len(data)
    assert torch.load(io.BytesIO(base64.b64decode(RemoteVLLMEngine.encode(x, torch.bfloat16))), weights_only=True).dtype == torch.bfloat16


def test_serving_copy_merges_the_lora_and_is_written_once(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    from lclm_rag.config import LatentConfig
    from lclm_rag.model import LatentContextModel

    enc, dec = tiny_models
    model = LatentContextModel.from_config(LatentConfig(encoder=enc, decoder=dec, encoder_layers=None,
                                                        decoder_lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    with torch.no_grad():  # a trained-looking adapter: B away from zero
        for name, p in model.decoder.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    copy_dir = serving_copy(model.decoder, home=tmp_path)
    assert copy_dir.name == f"decoder-{model.decoder.fingerprint()[:16]}" and not list(copy_dir.glob("adapter_*"))
    assert (copy_dir / "lclm_rag_prompt.jinja").read_text().strip() == PROMPT_TEMPLATE  # for `--chat-template`
    merged = AutoModelForCausalLM.from_pretrained(copy_dir, dtype=torch.float32).eval()
    ids = torch.tensor([model.decoder.text_ids("The tower was built in Paris.")])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model.decoder.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        with model.decoder.base():
            assert not torch.allclose(merged(input_ids=ids).logits, model.decoder.model(input_ids=ids).logits, atol=1e-3)
    stamp = (copy_dir / "config.json").stat().st_mtime_ns
    assert serving_copy(model.decoder, home=tmp_path) == copy_dir and (copy_dir / "config.json").stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------- token ids and latents
def test_a_prompt_splits_into_token_ids_and_latents(model, passages):
    """Text positions are found by their embedding rows and travel as text that tokenizes back to
    the same ids; latents and boundary embeddings travel as embeddings, in place."""
    from lclm_rag.serving import TokenTable

    dec = model.decoder
    segments = dec.qa_segments("Who designed the tower?", [passages[0], model.compress(passages[1:2])[0]])
    prompt = dec.embed(segments).detach()
    table = TokenTable(dec.model.get_input_embeddings().weight, dec.tokenizer)
    ids = table.token_ids(prompt)
    expected = [i for seg in segments for i in (seg.token_ids or [None] * seg.positions)]
    assert ids == expected
    parts = table.parts(prompt, torch.float32)
    assert [p["type"] for p in parts] == ["text", "prompt_embeds", "text"]
    rebuilt = []
    for part in parts:
        if part["type"] == "text":
            tokens = dec.text_ids(part["text"])
            rebuilt.append(dec.model.get_input_embeddings()(torch.tensor(tokens)).detach())
        else:
            rebuilt.append(torch.load(io.BytesIO(base64.b64decode(part["data"])), weights_only=True))
    assert torch.equal(torch.cat(rebuilt), prompt)  # the server's prompt, position for position


class _OldServer(http.server.BaseHTTPRequestHandler):
    """Stands in for a vLLM server without chat embeddings parts: no /tokenize, completions only."""

    bodies: list = []

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._reply(200, {"data": [{"id": "old-vllm"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/completions":
            return self._reply(404, {"detail": "Not Found"})
        type(self).bodies.append(body)
        self._reply(200, {"choices": [{"text": " Gustave Eiffel"}]})

    def log_message(self, *args) -> None:
        pass


def test_a_server_without_mixed_prompts_gets_whole_embeddings_said_once(model, caplog):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OldServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with caplog.at_level(logging.WARNING, logger="lclm_rag.engine"):
            engine = make_engine(model.decoder, url=f"http://127.0.0.1:{server.server_port}/v1", model="old-vllm")
            prompt = model.decoder.embed(model.decoder.qa_segments("Who?", ["The tower is named after Eiffel."])).detach()
            assert engine.generate([prompt, prompt], GenerationSettings(max_new_tokens=4)) == ["Gustave Eiffel"] * 2
    finally:
        server.shutdown()
    assert not engine.mixed
    assert [r.message for r in caplog.records if "whole prompts" in r.message] == [
        f"the vLLM server at http://127.0.0.1:{server.server_port}/v1 does not take embeddings in chat messages "
        '(404: {"detail": "Not Found"}): sending whole prompts as embeddings']
    sent = _OldServer.bodies[-1]["prompt_embeds"]
    torch.testing.assert_close(torch.load(io.BytesIO(base64.b64decode(sent)), weights_only=True), prompt)


# ---------------------------------------------------------------------------------------------- vLLM
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
vllm_tests = pytest.mark.xdist_group("vllm")  # one worker starts the server once for all of them


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """vLLM's own environment (its CPU build pins an older transformers than the library's); the
    README's test command creates it, so there these tests always run."""
    if not VLLM_PYTHON.exists():
        pytest.skip("no .venv-vllm: `bash scripts/setup.sh --vllm` (the README's test command) sets up the vLLM engine tests")
    return VLLM_PYTHON


def _env() -> dict[str, str]:
    # the setup's LCLM_RAG_HOME: both environments read the one converted SmolLM2 and one serving copy
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


def _answers(*engine_args: str, python: Path | str = sys.executable) -> tuple[list[str], str]:
    res = subprocess.run([str(python), str(EXAMPLE), *engine_args], capture_output=True, text=True, env=_env(), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    answers = [line[3:] for line in res.stdout.splitlines() if line.startswith("A: ")]
    assert len(answers) == 3, res.stdout
    return answers, res.stderr


@pytest.fixture(scope="session")
def hf_answers(vllm_python) -> list[str]:
    return _answers()[0]


@pytest.fixture(scope="session")
def vllm_server(vllm_python, tmp_path_factory):
    """``vllm serve`` on the serving copy, on 127.0.0.1 only, with the copy's prompt template and
    prefix caching; started once per test session (a module fixture would restart it whenever
    xdist runs another module's test between these) and stopped at its end."""
    export = subprocess.run([sys.executable, "-m", "lclm_rag.cli", "export-decoder"], capture_output=True, text=True, env=_env(), timeout=600)
    assert export.returncode == 0, export.stderr[-2000:]
    copy_dir = Path(export.stdout.split(": ", 1)[1].splitlines()[0])
    with start_vllm_server(copy_dir, tmp_path_factory.mktemp("server") / "server.log", python=vllm_python, env=_env()) as url:
        yield url


@vllm_tests
@pytest.mark.slow
def test_vllm_in_process_answers_the_example_questions_like_hf(hf_answers, vllm_python):
    assert _answers("--engine", "vllm", python=vllm_python)[0] == hf_answers


@vllm_tests
@pytest.mark.slow
def test_a_vllm_server_answers_the_example_questions_like_hf(hf_answers, vllm_server):
    answers, log = _answers("--decoder-url", vllm_server)
    assert answers == hf_answers
    assert "sending whole prompts" not in log  # token ids and latents went, not whole embeddings


@vllm_tests
@pytest.mark.slow
def test_the_server_takes_token_ids_for_text_and_loads_only_tensors(vllm_server, packaged_model, tmp_path):
    dec = packaged_model.decoder
    passages = ["The Eiffel Tower in Paris is named after Gustave Eiffel, whose company built it for the 1889 World's Fair.",
                "Photosynthesis in plants takes place in the chloroplasts, mostly in the cells of the leaves."]
    prompt = dec.embed(dec.qa_segments("Who is the Eiffel Tower named after?", [passages[0], packaged_model.compress(passages[1:])[0]])).detach()
    settings = GenerationSettings(max_new_tokens=12)
    mixed = make_engine(dec, url=vllm_server)
    whole = RemoteVLLMEngine(vllm_server, tokens=mixed.tokens, mixed=False)
    assert mixed.mixed and mixed.fallback is None and not whole.mixed
    sizes = [len(json.dumps(engine.request_body(prompt, settings, stream=False)[1])) for engine in (mixed, whole)]
    assert sizes[0] * 5 < sizes[1], sizes  # the passage as text: 2 latent slots' embeddings travel, not 100 positions'
    reference = dec.engine.generate([prompt], settings)
    assert mixed.generate([prompt], settings) == whole.generate([prompt], settings) == reference
    assert "".join(mixed.stream(prompt, settings)).strip() == reference[0]

    class Payload:  # what an unsafe torch.load would run
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    buffer = io.BytesIO()
    torch.save({"x": Payload()}, buffer)
    reply = mixed.client.post(f"{vllm_server}/completions", json={"model": mixed.model, "max_tokens": 1,
                                                                  "prompt_embeds": base64.b64encode(buffer.getvalue()).decode()})
    assert reply.status_code == 400 and "could not be deserialized" in reply.text
    assert not (tmp_path / "ran").exists()  # weights_only: the server loads tensors and nothing else
