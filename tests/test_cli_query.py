"""The query-side commands' errors: each is one line, ``error: ...``, exit 2 for usage and input, 3 for
the environment (store, model, checkpoint, server). Real files, servers and stores; in process."""

import http.server
import json
import threading
import time

import pytest

from lclm_rag.cli import main
from lclm_rag.errors import CheckpointError, EngineError, InputError


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def one_line(err: str) -> bool:
    return err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture
def server():
    """A real HTTP server whose answers a test sets: {path: (status, content type, body, delay)}."""
    routes: dict = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            if self.command == "POST":
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status, kind, body, delay = routes.get(self.path.split("?")[0], (404, "text/html", b"<html>not here</html>", 0))
            time.sleep(delay)
            try:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass  # the client gave up (a timeout test)

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", routes
    httpd.shutdown()


@pytest.mark.parametrize("flags, expected", [
    (["--latency-budget", "nan"], "finite"), (["--latency-budget", "inf"], "finite"),
    (["--qdrant-url", "garbage://host"], "must be http(s)://HOST[:PORT]"), (["--qdrant-url", "http://host:zz"], "is not a URL"),
    (["--qdrant-url", "http://host:99999"], "is not a URL"), (["--qdrant-url", ":zz"], "is not a URL"),
    (["--decoder-url", "http://127.0.0.1:9/v1", "--engine-args", '{"enforce_eager": true}'], "a server (--decoder-url) takes its own"),
    (["--decoder-url", "http://127.0.0.1:9/v1", "--decoder-timeout", "0"], "--decoder-timeout must be a positive"),
    (["--top-k", "0"], "top_k must be a positive integer"), (["--auto-threshold", "2"], "threshold must be in [0, 1]"),
])
def test_query_flag_mistakes_are_one_line_usage_errors(capsys, flags, expected):
    code, err = run(capsys, "query", "Who?", "--collection", "c", *flags)
    assert code == 2 and one_line(err) and expected in err, err


def test_a_server_that_is_not_qdrant_and_a_held_local_path_are_environment_errors(capsys, server, tmp_path):
    from lclm_rag.store import LatentStore

    url, routes = server
    routes["/collections/c"] = (200, "text/html", b"<html>a web page</html>", 0)
    code, err = run(capsys, "query", "Who?", "--collection", "c", "--qdrant-url", url)
    assert code == 3 and one_line(err) and f"cannot open collection 'c' at {url}" in err, err
    held = LatentStore.open("c", path=tmp_path / "local", backend="qdrant")  # qdrant-client local mode: one client a path
    try:
        code, err = run(capsys, "query", "Who?", "--collection", "c", "--backend", "qdrant", "--path", str(tmp_path / "local"))
        assert code == 3 and one_line(err) and "already accessed by another instance" in err, err
    finally:
        held.close()


def test_a_question_with_a_slot_marker_is_text(capsys):
    code, err = run(capsys, "query", "What is \u2063SLOT7\u2063?", "--collection", "c", "--latency-budget", "nan")
    assert code == 2 and "finite" in err  # parsed and checked like any other question (the marker is neutralised in the prompt)


@pytest.mark.parametrize("content, expected", [
    ('{"context": "c", "question": "q", "answers": ["a"]}\n{not json\n', ":2: not a JSON record"),
    ('[1, 2]\n', ":1: a record must be a JSON object"),
    ('{"question": "q", "answers": ["a"]}\n', "record 0 needs context, question and non-empty answers (context missing)"),
    ('{"context": 5, "question": "q", "answers": ["a"]}\n', "(context not a non-empty string (int))"),
    ('{"context": "c", "question": "q", "answers": "a"}\n', "answers not a non-empty list of strings"),
    ("", "no records"),
])
@pytest.mark.parametrize("command", ["eval", "fit-skim-probe"])
def test_malformed_qa_files_are_refused_before_any_model_loads(capsys, tmp_path, command, content, expected):
    data = tmp_path / "qa.jsonl"
    data.write_text(content)
    code, err = run(capsys, command, str(data))
    assert code == 2 and one_line(err) and expected in err, err


@pytest.mark.parametrize("command, flags, expected", [
    ("eval", ["--limit", "0"], "--limit must be at least 1"), ("eval", ["--top-k", "0"], "top_k must be"),
    ("eval", ["--max-new-tokens", "0"], "max_new_tokens must be"), ("eval", ["--auto-thresholds", "nan"], "is not in [0, 1]"),
    ("fit-skim-probe", ["--l2", "nan"], "--l2 must be"), ("fit-skim-probe", ["--top-k", "-1"], "top_k must be"),
])
def test_eval_and_probe_settings_are_checked_first(capsys, tmp_path, command, flags, expected):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"context": "c", "question": "q", "answers": ["a"]}\n')
    code, err = run(capsys, command, str(data), *flags)
    assert code == 2 and one_line(err) and expected in err, err


def test_compare_and_resume_refuse_files_that_are_not_results(capsys, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"context": "c", "question": "q", "answers": ["a"]}\n')
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"data": str(data), "n": 1, "seed": 0, "predictions": {"latent": ["a"]}}))
    for content, expected in [("{trunc", "not JSON"), ("[]", "not an `lclm-rag eval --output` file"),
                              (json.dumps({"n": 1, "seed": 0, "predictions": {"latent": [5]}, "data": str(data)}), "not a list of answers")]:
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        code, err = run(capsys, "compare", str(good), str(bad))
        assert code == 2 and one_line(err) and expected in err, err
    corrupt = tmp_path / "run.json"
    corrupt.write_text('{"scores": [], "predictions": {"latent": ["a"')  # a run cut off while being written
    code, err = run(capsys, "eval", str(data), "--output", str(corrupt), "--resume")
    assert code == 2 and one_line(err) and "cannot resume" in err and "drop --resume" in err, err


def test_a_checkpoint_whose_config_is_not_an_object(capsys, tmp_path, tiny_checkpoint):
    import shutil

    from lclm_rag.model import LatentContextModel

    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (checkpoint / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="a JSON object is expected, got list"):
        LatentContextModel.from_pretrained(checkpoint)
    code, err = run(capsys, "demo", "--checkpoint", str(checkpoint))
    assert code == 3 and one_line(err) and "config.json is not a checkpoint config" in err, err


def test_a_decoder_server_that_answers_wrongly_or_never(server, model):
    url, routes = server
    routes["/v1/models"] = (200, "application/json", json.dumps({"data": [{"id": "decoder-x"}]}).encode(), 0)
    segments = model.decoder.qa_segments("Who?", ["Gustave Eiffel built it."])
    try:
        engine = model.decoder.use_engine("vllm", url=f"{url}/v1", timeout=1.0)
        prompt = model.decoder.embed(segments).detach()
        from lclm_rag.engine import GenerationSettings

        settings = GenerationSettings(max_new_tokens=2)
        routes["/v1/completions"] = (200, "application/json", b'{"id": "x", "object": "text_completion"}', 0)
        with pytest.raises(EngineError, match=r"answered without a completion \(no choices\[0\].text\)"):
            engine.generate([prompt], settings)
        routes["/v1/completions"] = (200, "text/plain", b"<html>", 0)
        with pytest.raises(EngineError, match="not JSON"):
            engine.generate([prompt], settings)
        routes["/v1/completions"] = (200, "text/event-stream", b"data: {broken\n\ndata: [DONE]\n\n", 0)
        with pytest.raises(EngineError, match="streamed an event that is not JSON"):
            list(engine.stream(prompt, settings))
        routes["/v1/completions"] = (200, "text/event-stream", b'data: {"choices": []}\n\n', 0)
        with pytest.raises(EngineError, match="answered without a completion"):
            list(engine.stream(prompt, settings))
        routes["/v1/models"] = (200, "application/json", b'{"data": 5}', 0)
        with pytest.raises(EngineError, match="no vLLM server answers"):
            model.decoder.use_engine("vllm", url=f"{url}/v1", timeout=1.0)
        routes["/v1/completions"] = (200, "application/json", b"{}", 3)  # never answers within the timeout
        start = time.perf_counter()
        with pytest.raises(EngineError, match="did not answer"):
            engine.generate([prompt], settings)
        assert time.perf_counter() - start < 2.5  # the timeout given, not a fixed 300 s
    finally:
        model.decoder.use_engine("hf")
    with pytest.raises(InputError, match="must start with http"):
        model.decoder.use_engine("vllm", url="ftp://x")
