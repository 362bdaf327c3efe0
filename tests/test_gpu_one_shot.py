"""scripts/gpu_one_shot.py on CPU with tiny random models: a recipe packed into two calls, received
(a damaged part refused), trained in a time box, and its candidate unpacked and loaded."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from lclm_rag.data import load_jsonl
from lclm_rag.model import LatentContextModel

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_one_shot", REPO / "scripts" / "gpu_one_shot.py")
gpu_one_shot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_one_shot)

pytestmark = pytest.mark.xdist_group("gpu_one_shot")  # one worker packs once for both tests


def _jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_models, shared_data):
    """A tiny two-stage recipe (2 restoration steps, then a long QA stage) packed into two calls."""
    root = tmp_path_factory.mktemp("one-shot")
    enc, dec = tiny_models
    recipe = {
        "output_dir": str(root / "run-here"),
        "model": {"encoder": enc, "decoder": dec, "encoder_layers": None, "ratio": 4,
                  "decoder_lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "corpus": [_jsonl(root / "corpus.jsonl", load_jsonl(shared_data / "corpus/moby_dick.jsonl", limit=30))],
        "qa_data": [_jsonl(root / "qa.jsonl", load_jsonl(shared_data / "qa/quoref.jsonl", limit=200))],
        "qa_eval_file": _jsonl(root / "eval.jsonl", load_jsonl(shared_data / "qa/squad_dev.jsonl", limit=20)),
        "qa_eval_samples": 2, "calibration_passages": 16,
        "chunk_tokens": 24, "batch_size": 2, "warmup_steps": 2, "save_every": 1, "eval_every": 1000, "eval_passages": 4, "seed": 3,
        "stages": [{"name": "restoration", "steps": 2, "lr": 1e-3},
                   {"name": "qa", "steps": 5000, "lr": 1e-3, "distractors": 1, "mix_restoration": 0.5}],
    }
    (root / "recipe.json").write_text(json.dumps(recipe))
    # the two tiny models' float32 weights and tokenizers make ~67 MiB: two calls of at most 40
    assert gpu_one_shot.main(["pack", "--recipe", str(root / "recipe.json"), "--dir", str(root / "pack"),
                              "--call-mib", "40", "--part-mib", "8"]) == 0
    return root, enc


def test_pack_receive_train_and_unpack_a_candidate_on_cpu(packed, capsys):
    root, enc = packed
    pack, stage, out = root / "pack", root / "stage", root / "out"
    calls = json.loads((pack / "calls.json").read_text())
    assert [c["carry"] for c in calls] == [[f"{pack}/call1"], [f"{pack}/call2"]]
    assert "train --stage" in calls[1]["command"] and "train" not in calls[0]["command"]
    manifest = json.loads((pack / "call1" / "manifest.json").read_text())
    assert manifest["calls"] == 2 and all(p["size"] <= 8 << 20 for p in manifest["parts"])
    for call in (1, 2):
        assert sum(p.stat().st_size for p in (pack / f"call{call}").iterdir()) < 41 << 20

    assert gpu_one_shot.main(["receive", "--dir", str(pack / "call1"), "--stage", str(stage)]) == 0
    assert "still to come: call 2" in capsys.readouterr().out

    bad = root / "call2-damaged"  # one flipped byte in one part: one clear error, nothing of it kept
    shutil.copytree(pack / "call2", bad)
    victim = sorted(bad.glob("part-*"))[1]
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert gpu_one_shot.main(["receive", "--dir", str(bad), "--stage", str(stage)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"{victim} (call 2) is damaged: sha256" in err
    assert not (stage / "READY").exists() and not list((stage / "parts").glob("*.partial"))

    assert gpu_one_shot.main(["receive", "--dir", str(pack / "call2"), "--stage", str(stage)]) == 0
    assert "ready to train" in capsys.readouterr().out
    assert (stage / "files" / "data" / "qa_data-0-qa.jsonl").is_file()
    assert len(load_jsonl(stage / "files" / "data" / "eval-eval.jsonl")) == 2  # only the questions the run samples

    assert gpu_one_shot.main(["train", "--stage", str(stage), "--out", str(out), "--minutes", "10", "--device", "cpu",
                              "--max-steps", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "max-steps" and summary["state"]["global_step"] == 3 and summary["lost_steps"] == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["candidate.tar", "log.jsonl", "summary.json", "train.log"]
    assert all((out / f).stat().st_size < 16 << 20 for f in files)

    candidate = root / "candidate"
    assert gpu_one_shot.main(["unpack", "--from", str(out), "--to", str(candidate)]) == 0
    model = LatentContextModel.from_pretrained(candidate / "model")
    assert model.config.encoder == enc  # the base named as here, not where it was staged
    assert json.loads((candidate / "state.json").read_text())["global_step"] == 3
    assert [r["global_step"] for r in load_jsonl(candidate / "log.jsonl") if r["type"] == "train"] == [1, 2, 3]


@pytest.mark.slow
def test_the_time_box_stops_the_run_and_keeps_its_last_checkpoint(packed):
    root, _ = packed
    stage, out = root / "stage-deadline", root / "out-deadline"
    for call in (1, 2):
        assert gpu_one_shot.main(["receive", "--dir", str(root / "pack" / f"call{call}"), "--stage", str(stage)]) == 0
    assert gpu_one_shot.main(["train", "--stage", str(stage), "--out", str(out), "--minutes", "0.5", "--device", "cpu",
                              "--reserve-s", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "deadline" and 1 <= summary["state"]["global_step"] < 5002
    assert summary["wall_s"] < 30 + 20  # stopped at the deadline, exported within the grace period
    assert LatentContextModel.from_pretrained(gpu_one_shot.one_shot.unpack(out, root / "cand-deadline") / "model")
