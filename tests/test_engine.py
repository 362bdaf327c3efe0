"""Decode engines: transformers in process (reference), vLLM in process and a vLLM server.

The vLLM tests run the example script in a subprocess (vLLM starts worker processes) on the
packaged checkpoint and the example documents, and compare every answer with the HF engine's.
"""

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lclm_rag.engine import GenerationSettings, HFEngine, RemoteVLLMEngine, make_engine, serving_copy
from lclm_rag.errors import ConfigError, EngineError, InputError

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
    merged = AutoModelForCausalLM.from_pretrained(copy_dir, dtype=torch.float32).eval()
    ids = torch.tensor([model.decoder.text_ids("The tower was built in Paris.")])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model.decoder.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        with model.decoder.base():
            assert not torch.allclose(merged(input_ids=ids).logits, model.decoder.model(input_ids=ids).logits, atol=1e-3)
    stamp = (copy_dir / "config.json").stat().st_mtime_ns
    assert serving_copy(model.decoder, home=tmp_path) == copy_dir and (copy_dir / "config.json").stat().st_mtime_ns == stamp


# ---------------------------------------------------------------------------------------------- vLLM
@pytest.fixture(scope="module")
def vllm_installed():
    """The vLLM tests need the optional engine (`bash scripts/setup.sh --vllm`); without it they are
    reported as skipped, with this reason (pytest -ra)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed: run `bash scripts/setup.sh --vllm` to run the vLLM engine tests")


def _answers(*engine_args: str, home: Path) -> list[str]:
    env = {**os.environ, "LCLM_RAG_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    res = subprocess.run([sys.executable, str(EXAMPLE), *engine_args], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    answers = [line[3:] for line in res.stdout.splitlines() if line.startswith("A: ")]
    assert len(answers) == 3, res.stdout
    return answers


@pytest.fixture(scope="module")
def hf_answers(tmp_path_factory, vllm_installed):
    return _answers(home=tmp_path_factory.mktemp("home"))


@pytest.mark.slow
def test_vllm_in_process_answers_the_example_questions_like_hf(hf_answers, tmp_path):
    assert _answers("--engine", "vllm", home=tmp_path) == hf_answers
    assert list((tmp_path / "serving").glob("decoder-*/config.json"))  # the merged copy vLLM loaded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_vllm_server_answers_the_example_questions_like_hf(hf_answers, tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "LCLM_RAG_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    export = subprocess.run([sys.executable, "-m", "lclm_rag.cli", "export-decoder"], capture_output=True, text=True, env=env, timeout=600)
    assert export.returncode == 0, export.stderr[-2000:]
    copy_dir = next((home / "serving").glob("decoder-*"))
    port = _free_port()
    # the module entry point: vllm-cpu's `vllm` script looks itself up under the name "vllm" and fails
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(copy_dir),
                               "--enable-prompt-embeds", "--dtype", "float32",
                               "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "4096", "--enforce-eager"],
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"), env=env)
    try:
        import httpx

        deadline = time.time() + 600
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        assert _answers("--decoder-url", f"http://127.0.0.1:{port}/v1", home=home) == hf_answers
    finally:
        server.terminate()
        server.wait(timeout=60)
