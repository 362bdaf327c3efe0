import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from lclm_rag.config import LatentConfig
from lclm_rag.data import load_jsonl
from lclm_rag.errors import ConfigError
from lclm_rag.model import LatentContextModel
from lclm_rag.skim import SkimProbe
from lclm_rag.training import TrainConfig, train
from lclm_rag.training.examples import ExampleSource

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
pytestmark = pytest.mark.usefixtures("shared_data", "training_data")
_DATA: dict[str, str] = {}


@pytest.fixture(scope="module")
def training_data(tmp_path_factory, shared_data) -> dict[str, str]:
    """The first records of a real corpus and QA set: as real as the whole files, tokenized in a fraction of the time."""
    root = tmp_path_factory.mktemp("training-data")
    for key, source, records in (("corpus", "corpus/moby_dick.jsonl", 30), ("qa", "qa/quoref.jsonl", 300)):
        path = root / Path(source).name
        path.write_text("".join(json.dumps(r) + "\n" for r in load_jsonl(shared_data / source, limit=records)))
        _DATA[key] = str(path)
    return _DATA


def _config(tmp_path, tiny_models, out: str, steps=(6, 4), batch_size: int = 2, **extra) -> Path:
    enc, dec = tiny_models
    cfg = {
        "output_dir": str(tmp_path / out),
        "model": {"encoder": enc, "decoder": dec, "encoder_layers": None, "ratio": 4,
                  "decoder_lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "corpus": [_DATA["corpus"]],
        "qa_data": [_DATA["qa"]],
        "chunk_tokens": 24, "batch_size": batch_size, "warmup_steps": 2, "save_every": 1, "eval_every": 100,
        "eval_passages": 4, "seed": 3,
        "stages": [{"name": "restoration", "steps": steps[0], "lr": 1e-3},
                   {"name": "qa", "steps": steps[1], "lr": 1e-3, "distractors": 1, "mix_restoration": 0.5}],
        **extra,
    }
    path = tmp_path / f"{out}.json"
    path.write_text(json.dumps(cfg))
    return path


def _losses(out_dir: Path) -> dict[int, float]:
    return {r["global_step"]: r["loss"] for r in load_jsonl(out_dir / "log.jsonl") if r["type"] == "train"}


def test_stages_run_log_and_save(tmp_path, tiny_models):
    final = train(TrainConfig.load(_config(tmp_path, tiny_models, "run")))
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 11))
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    assert any(r["type"] == "eval" and "restoration_acc_control" in r for r in load_jsonl(tmp_path / "run" / "log.jsonl"))
    model = LatentContextModel.from_pretrained(final)
    assert model.config.decoder_lora and (final / "decoder_lora").exists()


@pytest.mark.slow
def test_kill_9_then_resume_continues_the_same_curve(tmp_path, tiny_models):
    reference = train(TrainConfig.load(_config(tmp_path, tiny_models, "ref")))
    cfg = _config(tmp_path, tiny_models, "killed")
    args = [sys.executable, "-m", "lclm_rag.cli", "train", "--config", str(cfg)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(_losses(tmp_path / "killed")) >= 7):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 7 <= len(_losses(tmp_path / "killed")) < 10, "the kill must land mid-run"
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed, ref = _losses(tmp_path / "killed"), _losses(tmp_path / "ref")
    assert sorted(resumed) == sorted(ref) == list(range(1, 11))
    for step in ref:
        assert resumed[step] == pytest.approx(ref[step], abs=1e-4), step
    a = LatentContextModel.from_pretrained(reference)
    b = LatentContextModel.from_pretrained(tmp_path / "killed" / "final")
    torch.testing.assert_close(a.decoder.projector.fc2.weight, b.decoder.projector.fc2.weight, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_double_batch(tmp_path, tiny_models):
    single = train(TrainConfig.load(_config(tmp_path, tiny_models, "single", steps=(3, 0), batch_size=4)))
    cfg = _config(tmp_path, tiny_models, "ddp", steps=(3, 0), batch_size=2)
    script = "from lclm_rag.training import main_from_config; import sys; main_from_config(sys.argv[1])"
    (tmp_path / "ddp_main.py").write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                          str(tmp_path / "ddp_main.py"), str(cfg)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a = LatentContextModel.from_pretrained(single)
    b = LatentContextModel.from_pretrained(tmp_path / "ddp" / "final")
    for (name, p), (_, q) in zip(a.decoder.projector.named_parameters(), b.decoder.projector.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)
    assert [r["samples"] for r in load_jsonl(tmp_path / "ddp" / "log.jsonl") if r["type"] == "train"] == [4, 8, 12]


def test_config_errors(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match="evaluation only"):
        TrainConfig.load(_config(tmp_path, tiny_models, "bad", qa_data=[str(SHARED / "qa" / "squad_dev.jsonl")]))
    raw = json.loads(_config(tmp_path, tiny_models, "bad2").read_text())
    raw["stages"][0]["name"] = "pretraining"
    with pytest.raises(ConfigError, match="stage name"):
        TrainConfig.from_dict(raw)
    raw["stages"][0].update(name="restoration", part_lr={"encoder_lora": 1e-4})
    with pytest.raises(ConfigError, match=r"part_lr names \['encoder_lora'\], which the stage does not train"):
        TrainConfig.from_dict(raw)


def test_qa_data_from_a_dataset_spec_and_eval_passages_refused(tmp_path, tiny_models):
    """`datasets` specs train like JSONL files; QA passages shared with qa_eval_file are refused."""
    hub_style = [{"context": r["context"], "question": r["question"], "answers": {"text": r["answers"], "answer_start": [0]}}
                 for r in load_jsonl(SHARED / "qa" / "quoref.jsonl", limit=20)]
    data = tmp_path / "qa_train.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in hub_style))
    spec = {"dataset": "json", "data_files": str(data), "split": "train"}
    raw = json.loads(_config(tmp_path, tiny_models, "hf", steps=(1, 2), qa_data=[spec]).read_text())
    final = train(TrainConfig.from_dict(raw))
    assert [r["stage"] for r in load_jsonl(tmp_path / "hf" / "log.jsonl") if r["type"] == "train"] == ["restoration", "qa", "qa"]
    assert json.loads((tmp_path / "hf" / "train_config.json").read_text())["qa_data"][0]["dataset"] == "json"
    assert (final / "config.json").exists()

    leaked = tmp_path / "leak.jsonl"
    leaked.write_text("".join(json.dumps(r) + "\n" for r in load_jsonl(SHARED / "qa" / "squad_dev.jsonl", limit=3)))
    raw = json.loads(_config(tmp_path, tiny_models, "leak", qa_data=[str(leaked)],
                             qa_eval_file=str(SHARED / "qa" / "squad_dev.jsonl")).read_text())
    with pytest.raises(ConfigError, match=r"shares \d+ passages with qa_eval_file"):
        train(TrainConfig.from_dict(raw))


def test_part_lr_sets_each_part_its_own_learning_rate(tmp_path, tiny_models):
    raw = json.loads(_config(tmp_path, tiny_models, "plr", steps=(3, 0)).read_text())
    raw["stages"][0]["part_lr"] = {"decoder_lora": 0.0}  # frozen by its lr; the projector still learns at 1e-3
    path = tmp_path / "plr.json"
    path.write_text(json.dumps(raw))
    final = train(TrainConfig.load(path))
    model = LatentContextModel.from_pretrained(final)
    lora_b = [p for n, p in model.decoder.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)  # LoRA B starts at zero and never moved
    saved = torch.load(tmp_path / "plr" / "checkpoint" / "trainer.pt", weights_only=False)["optimizer"]["param_groups"]
    assert [(g["name"], g["initial_lr"]) for g in saved] == [("projector", 1e-3), ("boundary", 1e-3), ("decoder_lora", 0.0)]


def test_fresh_training_calibrates_the_projector_and_init_from_can_change_the_ratio(tmp_path, tiny_models):
    final = train(TrainConfig.load(_config(tmp_path, tiny_models, "cal", steps=(2, 1))))
    model = LatentContextModel.from_pretrained(final)
    assert model.decoder.projector.calibrated  # saved with the checkpoint
    n_weights = model.decoder.model.config.num_hidden_layers * model.decoder.model.config.num_attention_heads + 2
    SkimProbe(torch.zeros(n_weights), model.decoder.fingerprint()).save_pretrained(final)
    cfg = json.loads(_config(tmp_path, tiny_models, "r8", steps=(1, 1)).read_text())
    cfg.update(init_from=str(final), model={"ratio": 8})
    path = tmp_path / "r8.json"
    path.write_text(json.dumps(cfg))
    r8 = LatentContextModel.from_pretrained(train(TrainConfig.load(path)))
    assert r8.config.ratio == 8 and r8.fingerprint() != model.fingerprint()
    assert r8.skim_probe is None  # fitted on the reader the run retrained: it does not carry over
    # the r4 statistics are kept (the projector was trained on them), not re-measured
    torch.testing.assert_close(r8.decoder.projector.latent_shift, model.decoder.projector.latent_shift)
    assert r8.compress(["one two three four five six seven eight nine"])[0].shape[0] == 2


def test_reinit_puts_a_fresh_calibrated_projector_under_a_trained_decoder(tmp_path, tiny_models):
    final = train(TrainConfig.load(_config(tmp_path, tiny_models, "old", steps=(2, 1))))
    old = LatentContextModel.from_pretrained(final)
    cfg = json.loads(_config(tmp_path, tiny_models, "new", steps=(1, 1)).read_text())
    cfg.update(init_from=str(final), reinit=["projector"], model={"encoder_attention": "bidirectional"})
    cfg["stages"] = [{"name": "restoration", "steps": 1, "lr": 1e-9, "train": ["boundary"]}]
    path = tmp_path / "new.json"
    path.write_text(json.dumps(cfg))
    new = LatentContextModel.from_pretrained(train(TrainConfig.load(path)))
    assert new.config.encoder_attention == "bidirectional" and new.decoder.projector.calibrated
    # the projector and its statistics start afresh on the new encoder's latents; the decoder LoRA is the old one
    assert not torch.allclose(new.decoder.projector.fc1.weight, old.decoder.projector.fc1.weight)
    assert not torch.allclose(new.decoder.projector.latent_shift, old.decoder.projector.latent_shift)
    old_lora = {n: p for n, p in old.decoder.model.named_parameters() if "lora_" in n}
    new_lora = {n: p for n, p in new.decoder.model.named_parameters() if "lora_" in n}
    assert old_lora.keys() == new_lora.keys() and all(torch.equal(old_lora[n], new_lora[n]) for n in old_lora)
    for bad, message in (({"reinit": ["decoder_lora"]}, "cannot start fresh"), ({"init_from": None}, "set init_from")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_dict({**cfg, **bad})


def test_init_from_can_add_an_encoder_lora_that_starts_as_the_identity(tmp_path, tiny_models):
    final = train(TrainConfig.load(_config(tmp_path, tiny_models, "base", steps=(2, 1))))
    base = LatentContextModel.from_pretrained(final)
    assert not (final / "encoder_lora").exists()
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    widened = LatentContextModel.from_pretrained(final, encoder_lora=lora)
    text = ["Call me Ishmael. Some years ago, never mind how long precisely."]
    torch.testing.assert_close(widened.compress(text)[0], base.compress(text)[0])  # zero-init: same latents
    cfg = json.loads(_config(tmp_path, tiny_models, "enc", steps=(1, 2)).read_text())
    cfg.update(init_from=str(final), model={"encoder_lora": lora})
    cfg["stages"] = [{"name": "qa", "steps": 2, "lr": 1e-2, "distractors": 1, "train": ["encoder_lora", "projector"]}]
    path = tmp_path / "enc.json"
    path.write_text(json.dumps(cfg))
    tuned = LatentContextModel.from_pretrained(train(TrainConfig.load(path)))
    assert tuned.config.encoder_lora and tuned.fingerprint() != base.fingerprint()
    assert not torch.allclose(tuned.compress(text)[0], base.compress(text)[0])  # the trained LoRA shapes the latents


def test_data_seed_draws_new_examples_but_keeps_the_held_out_split(tmp_path, tiny_models):
    cfg = TrainConfig.load(_config(tmp_path, tiny_models, "seeds"))
    model = LatentContextModel.from_config(LatentConfig(**cfg.model))
    same, other = ExampleSource(cfg, model), ExampleSource(dataclasses.replace(cfg, data_seed=7), model)
    assert other.heldout_chunks == same.heldout_chunks and other.chunks == same.chunks
    stage = cfg.stages[0]
    drawn = [(same.example(0, stage, i).target, other.example(0, stage, i).target) for i in range(8)]
    assert sum(a != b for a, b in drawn) >= 6
    assert [same.example(0, stage, i).target for i in range(8)] == [a for a, _ in drawn]  # still deterministic


def test_alignment_then_a_ratio_curriculum(tmp_path, tiny_models):
    raw = json.loads(_config(tmp_path, tiny_models, "cur").read_text())
    raw["stages"] = [{"name": "alignment", "steps": 8, "lr": 1e-3, "train": ["projector"], "ratio": 1},
                     {"name": "restoration", "steps": 2, "lr": 1e-3, "ratio": 2},
                     {"name": "restoration", "steps": 2, "lr": 1e-3, "ratio": 4}]
    path = tmp_path / "cur.json"
    path.write_text(json.dumps(raw))
    final = train(TrainConfig.load(path))
    rows = [r for r in load_jsonl(tmp_path / "cur" / "log.jsonl") if r["type"] == "train"]
    assert [r["ratio"] for r in rows] == [1] * 8 + [2] * 2 + [4] * 2
    align = rows[:8]
    assert all("cosine" in r and "token_acc" not in r for r in align) and all("token_acc" in r for r in rows[8:])
    cosine = [r["cosine"] for r in align]  # the regression learns: projected latents turn towards the token embeddings
    assert sum(cosine[-4:]) / 4 > sum(cosine[:2]) / 2 + 0.05
    model = LatentContextModel.from_pretrained(final)
    assert model.config.ratio == 4 and model.compress(["one two three four five six seven eight nine"])[0].shape[0] == 3


def test_memory_pooling_aligns_with_its_memory_embeddings(tmp_path, tiny_models):
    from lclm_rag.config import LatentConfig

    def run(name: str, parts: list[str]) -> LatentContextModel:
        raw = json.loads(_config(tmp_path, tiny_models, name).read_text())
        raw["model"].update(pooling="memory", encoder_layers=1)
        raw["stages"] = [{"name": "alignment", "steps": 3, "lr": 1e-2, "train": parts},
                         {"name": "restoration", "steps": 1, "lr": 1e-3, "train": [*parts, "decoder_lora"]}]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(raw))
        return LatentContextModel.from_pretrained(train(TrainConfig.load(path)))

    torch.manual_seed(3)  # the trainer seeds with cfg.seed before building the fresh model
    start = LatentContextModel.from_config(LatentConfig(**json.loads(_config(tmp_path, tiny_models, "x").read_text())["model"]
                                                       | {"pooling": "memory", "encoder_layers": 1}))
    frozen, trained = run("frozen", ["projector"]), run("mem", ["projector", "memory"])
    assert trained.config.pooling == "memory"
    torch.testing.assert_close(frozen.compressor.memory_embeddings, start.compressor.memory_embeddings)
    assert not torch.allclose(trained.compressor.memory_embeddings, start.compressor.memory_embeddings)
    assert trained.compressor.fingerprint() != frozen.compressor.fingerprint() == start.compressor.fingerprint()


def test_alignment_needs_a_shared_tokenizer_and_never_trains_the_decoder(tmp_path, tiny_models):
    from lclm_rag.config import LatentConfig
    from lclm_rag.training.objectives import check_shared_tokenizer
    from lclm_rag.training.recipe import StageConfig

    for parts in (["projector", "decoder_lora"], ["projector", "boundary"], ["memory"]):
        with pytest.raises(ConfigError, match="alignment stage trains the projector"):
            StageConfig(name="alignment", steps=1, train=parts)
    StageConfig(name="alignment", steps=1, train=["projector", "memory", "encoder_lora"])
    with pytest.raises(ConfigError, match="ratio must be a positive integer"):
        StageConfig(name="restoration", steps=1, ratio=0)
    enc, dec = tiny_models
    model = LatentContextModel.from_config(LatentConfig(encoder=enc, decoder=dec, encoder_layers=None))
    check_shared_tokenizer(model)  # same tokenizer: fine
    model.decoder.tokenizer.add_tokens(["<extra-token>"])
    with pytest.raises(ConfigError, match="needs the encoder and decoder to share a tokenizer"):
        check_shared_tokenizer(model)


def test_qa_stage_distils_the_full_text_teachers_answers(tmp_path, tiny_models):
    from lclm_rag.training.examples import ExampleSource
    from lclm_rag.training.recipe import StageConfig
    from lclm_rag.training.teacher import TeacherAnswers

    with pytest.raises(ConfigError, match="answers must be one of"):
        StageConfig(name="qa", steps=1, answers="silver")
    with pytest.raises(ConfigError, match="applies to a qa stage"):
        StageConfig(name="restoration", steps=1, answers="teacher")
    raw = json.loads(_config(tmp_path, tiny_models, "pisco", steps=(1, 4)).read_text())
    raw["stages"][1]["answers"] = "teacher"
    raw["teacher_max_new_tokens"] = 6
    path = tmp_path / "pisco.json"
    path.write_text(json.dumps(raw))
    cfg = TrainConfig.load(path)
    train(cfg, max_steps=3)  # killed mid-stage, then resumed: the cached labels are reused, not regenerated
    final = train(cfg)
    rows = load_jsonl(tmp_path / "pisco" / "teacher_answers.0.jsonl")
    keys = [r["key"] for r in rows]
    assert rows and len(keys) == len(set(keys))
    # the labels are what the base decoder (adapters off) answers from the passages as text
    model = LatentContextModel.from_pretrained(final).eval()
    source = ExampleSource(cfg, model)
    stage = cfg.stages[1]
    qa = [ex for ex in (source.example(1, stage, i) for i in range(4 * cfg.batch_size)) if ex.task == "qa"]
    assert qa and {TeacherAnswers.key(ex) for ex in qa} == set(keys)
    ex = qa[0]
    with torch.no_grad(), model.decoder.base():
        expected = model.decoder.generate_from_segments([model.decoder.segments(ex.user_message, ex.passages)], max_new_tokens=6)[0]
    assert dict(zip(keys, (r["answer"] for r in rows)))[TeacherAnswers.key(ex)] == expected
    assert expected != ex.target  # the teacher's answer, not the gold one, was trained on


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").rglob("*.json")), ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_shipped_recipes_are_valid_configs(recipe):
    cfg = TrainConfig.load(recipe)
    assert cfg.stages and all(Path(p).name != "squad_dev.jsonl" for p in cfg.qa_data)


def test_evaluate_heldout_measures_the_recipes_unseen_chunks(tmp_path, tiny_models):
    from lclm_rag.cli import main
    from lclm_rag.config import LatentConfig
    from lclm_rag.evaluation import restoration_accuracy
    from lclm_rag.training import evaluate_heldout
    from lclm_rag.training.examples import ExampleSource

    recipe = _config(tmp_path, tiny_models, "heldout")
    cfg = TrainConfig.load(recipe)
    model = LatentContextModel.from_config(LatentConfig(**cfg.model))
    checkpoint = model.save_pretrained(tmp_path / "ckpt")
    source = ExampleSource(cfg, model)
    assert source.heldout_chunks and not set(source.heldout_chunks) & set(source.chunks)
    assert source.eval_chunks == source.heldout_chunks[: cfg.eval_passages]

    result = evaluate_heldout(cfg, checkpoint, batch_size=4)
    assert result["passages"] == 4 * (len(source.heldout_chunks) // 4) > 0
    assert result["fingerprint"] == model.compressor.fingerprint() and result["ratio"] == 4
    batches = [source.heldout_chunks[i : i + 4] for i in range(0, result["passages"], 4)]
    loaded = LatentContextModel.from_pretrained(checkpoint)
    own = sum(restoration_accuracy(loaded, b) for b in batches) / len(batches)
    control = sum(restoration_accuracy(loaded, b, control=True) for b in batches) / len(batches)
    assert (result["restoration_acc"], result["control"]) == (round(own, 4), round(control, 4))

    out = tmp_path / "heldout_result.json"
    assert main(["train", "--config", str(recipe), "--evaluate", str(checkpoint), "--batch-size", "4",
                 "--output", str(out)]) == 0
    assert json.loads(out.read_text())["checkpoints"][str(checkpoint)] == result  # deterministic
    with pytest.raises(ConfigError, match="fewer than one batch of 100000"):
        evaluate_heldout(cfg, checkpoint, batch_size=100_000)


def test_concat_bidirectional_curriculum_trains_its_pooling_only_at_its_own_ratio(tmp_path, tiny_models):
    raw = json.loads(_config(tmp_path, tiny_models, "concat").read_text())
    raw["model"].update(pooling="concat", encoder_attention="bidirectional")
    raw["stages"] = [{"name": "restoration", "steps": 2, "lr": 1e-3, "ratio": 2, "train": ["projector", "pooling"]},
                     {"name": "restoration", "steps": 3, "lr": 1e-2, "ratio": 4, "train": ["projector", "pooling"]}]
    path = tmp_path / "concat.json"
    path.write_text(json.dumps(raw))
    fresh = LatentContextModel.from_config(LatentConfig(**raw["model"]))
    start = fresh.compressor.concat_pool.proj.weight.detach().clone()
    final = train(TrainConfig.load(path))
    model = LatentContextModel.from_pretrained(final)
    assert (model.config.pooling, model.config.encoder_attention, model.config.ratio) == ("concat", "bidirectional", 4)
    assert not torch.equal(model.compressor.concat_pool.proj.weight, start)  # trained at 1:4
    assert model.fingerprint() != fresh.fingerprint()


def test_recipes_compose_from_a_base(tmp_path, tiny_models):
    from lclm_rag.errors import ConfigError
    from lclm_rag.training import load_recipe

    base = _config(tmp_path, tiny_models, "base")
    (tmp_path / "child.json").write_text(json.dumps({"base": base.name, "output_dir": str(tmp_path / "child"),
                                                      "model": {"ratio": 8}, "stages": [{"name": "qa", "steps": 1}]}))
    merged = load_recipe(tmp_path / "child.json")
    parent = json.loads(base.read_text())
    assert merged["model"] == {**parent["model"], "ratio": 8}  # dicts merge key by key
    assert merged["stages"] == [{"name": "qa", "steps": 1}] and merged["corpus"] == parent["corpus"]  # lists are replaced
    cfg = TrainConfig.load(tmp_path / "child.json")
    assert cfg.output_dir == str(tmp_path / "child") and cfg.stages[0].name == "qa"
    (tmp_path / "loop.json").write_text(json.dumps({"base": "loop.json"}))
    with pytest.raises(ConfigError, match="its own base"):
        load_recipe(tmp_path / "loop.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.load(tmp_path / "broken.json")
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.load(tmp_path / "missing.json")


def _tiny_model_and_source(tmp_path, tiny_models, **stage):
    cfg = TrainConfig.load(_config(tmp_path, tiny_models, "step"))
    if stage:
        cfg.stages[1] = dataclasses.replace(cfg.stages[1], **stage)
    model = LatentContextModel.from_config(LatentConfig(**cfg.model))
    return cfg, model, ExampleSource(cfg, model)


def test_the_heldout_answer_loss_reads_unseen_questions_as_the_qa_stage_does(tmp_path, tiny_models):
    from lclm_rag.cli import main
    from lclm_rag.training.heldout import heldout_answer_loss, heldout_qa_examples

    qa = tmp_path / "squad_dev.jsonl"  # the evaluation-only file, read here for evaluation
    qa.write_text("".join(json.dumps(r) + "\n" for r in load_jsonl(SHARED / "qa" / "squad_dev.jsonl", limit=40)))
    recipe = _config(tmp_path, tiny_models, "answers", qa_eval_file=str(qa))
    cfg = TrainConfig.load(recipe)
    model = LatentContextModel.from_config(LatentConfig(**cfg.model))
    own, control = heldout_qa_examples(cfg, model, 12)
    records = {r["question"].strip(): r for r in load_jsonl(qa)}
    for ex, swapped in zip(own, control):
        question = next(q for q in records if q in ex.user_message)
        assert records[question]["context"] in ex.passages and len(ex.passages) == 2  # gold + the stage's 1 distractor
        assert question in swapped.user_message and records[question]["context"] not in swapped.passages
        assert swapped.target == ex.target
    result = heldout_answer_loss(cfg, model, 12)
    assert result["questions"] == 12 and 0 < result["answer_loss"] != result["answer_loss_control"] > 0
    checkpoint = model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "answers.json"
    assert main(["train", "--config", str(recipe), "--evaluate", str(checkpoint), "--batch-size", "4",
                 "--questions", "12", "--output", str(out)]) == 0
    scored = json.loads(out.read_text())["checkpoints"][str(checkpoint)]
    assert scored["answer_loss"] == pytest.approx(result["answer_loss"], abs=2e-4)
    with pytest.raises(ConfigError, match="qa_eval_file"):
        heldout_answer_loss(TrainConfig.load(_config(tmp_path, tiny_models, "none")), model, 4)


def test_the_unpadded_step_has_the_padded_steps_loss_and_gradients(tmp_path, tiny_models):
    cfg, model, source = _tiny_model_and_source(tmp_path, tiny_models)
    batch = [source.example(1, cfg.stages[1], i) for i in range(6)]
    assert {ex.task for ex in batch} == {"qa", "restoration"}  # prompts of very different lengths
    from lclm_rag.training.objectives import shared_prefix_length

    with torch.no_grad():
        embedded = [model.decoder.embed(model.decoder.segments(ex.user_message, ex.passages)) for ex in batch]
    assert shared_prefix_length(embedded) > 10  # the system turn
    _assert_unpadded_matches_padded(model, batch)


def _assert_unpadded_matches_padded(model, batch, parts=("projector", "boundary", "decoder_lora")) -> int:
    """The padded and the unpadded step's loss, accuracy and gradients agree; returns the positions the unpadded one ran."""
    from lclm_rag.training.objectives import TrainingModule
    from lclm_rag.training.parts import set_trainable

    params = set_trainable(model, list(parts))
    encoder_trainable = "encoder" in parts
    model.train()
    results, positions = [], []
    for unpadded in (False, True):
        seen = []
        handle = model.decoder.model.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[0] * kwargs["inputs_embeds"].shape[1]),
            with_kwargs=True)
        try:
            loss, metric, value = TrainingModule(model, unpadded=unpadded, cache_latents=False)(batch, encoder_trainable)
        finally:
            handle.remove()
        loss.backward()
        results.append((loss.item(), value, [p.grad.clone() for p in params]))
        positions.append(sum(seen))
        model.zero_grad()
    (padded_loss, padded_acc, padded_grads), (loss, acc, grads) = results
    assert loss == pytest.approx(padded_loss, rel=1e-5) and acc == padded_acc
    for a, b in zip(padded_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    return positions[1]


def test_questions_over_the_same_passages_share_their_prompt_in_the_step(tmp_path, tiny_models):
    qa = tmp_path / "squadshifts.jsonl"  # ~5 questions a passage
    qa.write_text("".join(json.dumps(r) + "\n" for r in load_jsonl(SHARED / "qa" / "squadshifts_nyt.jsonl", limit=60)))
    cfg = TrainConfig.load(_config(tmp_path, tiny_models, "step", qa_data=[str(qa)]))
    cfg.stages[1] = dataclasses.replace(cfg.stages[1], questions_per_context=2, mix_restoration=0.0)
    model = LatentContextModel.from_config(LatentConfig(**cfg.model))
    source = ExampleSource(cfg, model)
    grouped = [source.example(1, cfg.stages[1], i) for i in range(8)]
    pairs = [(a, b) for a, b in zip(grouped[::2], grouped[1::2])]
    shared = [(a, b) for a, b in pairs if a.passages == b.passages]
    assert len(shared) == 4
    assert all(a.user_message != b.user_message for a, b in shared)  # the same passages, another question
    assert [ex.passages for ex in grouped] == [ex.passages for ex in (source.example(1, cfg.stages[1], i) for i in range(8))]
    a, b = shared[0]
    batch = [a, b, *shared[1]]
    unpadded = _assert_unpadded_matches_padded(model, batch)
    with torch.no_grad():
        lengths = [len(model.decoder.embed(model.decoder.segments(ex.user_message, ex.passages))) for ex in batch]
    alone = sum(lengths) + sum(len(model.decoder.text_ids(ex.target)) for ex in batch)  # each example on its own
    assert unpadded < alone - (lengths[0] + lengths[2]) / 2, (unpadded, alone)  # each pair's passages ran once
    # while the encoder trains too: each distinct passage encoded once a step, its gradient from every question
    assert _assert_unpadded_matches_padded(model, batch, ("encoder", "projector", "decoder_lora")) == unpadded
    with pytest.raises(ConfigError, match="does not divide batch_size"):
        TrainConfig.load(_config(tmp_path, tiny_models, "odd", batch_size=3,
                                 stages=[{"name": "qa", "steps": 1, "questions_per_context": 2}]))


def test_latents_are_cached_only_while_the_compressor_is_frozen(tmp_path, tiny_models):
    from lclm_rag.training.objectives import TrainingModule

    _, model, source = _tiny_model_and_source(tmp_path, tiny_models)
    passages = source.qa_pool[:3]
    wrapper = TrainingModule(model)
    first = wrapper.latents(passages, encoder_trainable=False)
    calls = model.compressor.encoder_calls
    again = wrapper.latents(passages[::-1], encoder_trainable=False)
    assert model.compressor.encoder_calls == calls  # no encoder forward: every passage came from the cache
    for a, b in zip(first, again[::-1]):
        assert a is b and not a.requires_grad
    torch.testing.assert_close(first[0], model.compressor.encode_ids(model.compressor.tokenize(passages[:1]))[0])
    model.compressor.requires_grad_(True)
    trained = wrapper.latents(passages + passages[:1], encoder_trainable=True)
    assert trained[0].requires_grad and not wrapper._latents  # a step that trains the encoder empties the cache
    assert trained[3] is trained[0]  # a passage read twice in a step is encoded once


def test_a_sidecar_stage_puts_each_passages_key_terms_after_its_latents(tmp_path, tiny_models):
    from lclm_rag.sidecar import key_terms

    cfg, _, source = _tiny_model_and_source(tmp_path, tiny_models, key_terms=4, mix_restoration=0.0)
    ex = source.example(1, cfg.stages[1], 0)
    for i, passage in enumerate(ex.passages):
        terms = key_terms(passage, 4)
        assert terms and f"{i + 1}] \u2063SLOT{i}\u2063 Key terms: {'; '.join(terms)}\n" in ex.user_message
    with pytest.raises(ConfigError, match="key_terms"):
        TrainConfig.from_dict({"output_dir": "x", "stages": [{"name": "qa", "steps": 1, "key_terms": -1}]})
    cfg.stages[1] = dataclasses.replace(cfg.stages[1], steps=1)
    cfg.stages[0] = dataclasses.replace(cfg.stages[0], steps=1)
    assert LatentConfig.load(train(cfg)).sidecar_terms == 4  # the checkpoint reads the sidecar it was trained with
    with pytest.raises(ConfigError, match="sidecar_terms must be a count >= 0"):
        LatentConfig(sidecar_terms=-1)


def test_the_training_benchmark_times_the_three_steps(tmp_path, tiny_models):
    from lclm_rag.training.bench import bench_training

    qa = tmp_path / "squadshifts.jsonl"  # ~5 questions a passage
    qa.write_text("".join(json.dumps(r) + "\n" for r in load_jsonl(SHARED / "qa" / "squadshifts_nyt.jsonl", limit=60)))
    cfg = TrainConfig.load(_config(tmp_path, tiny_models, "bench", qa_data=[str(qa)]))
    result = bench_training(cfg, steps=2, questions_per_context=2)
    padded, unpadded, grouped = result["rows"]
    assert result["stage"] == "qa" and result["questions_per_context"] == 2
    assert padded["losses"] == pytest.approx(unpadded["losses"], rel=1e-4)  # the same learning, step by step
    assert unpadded["cache_fill_s_per_passage"] > 0 and padded["qa_examples_per_hour"] > 0
    assert grouped["qa_examples"] > 0 and grouped["losses"] != unpadded["losses"]  # its own examples
    with pytest.raises(ConfigError, match="does not divide"):
        bench_training(cfg, steps=1, questions_per_context=3)


def test_a_run_continues_on_a_fresh_clone_from_its_compact_candidate(tmp_path, tiny_models):
    from lclm_rag.training.loop import export_run_candidate

    reference = _config(tmp_path, tiny_models, "whole")
    train(TrainConfig.load(reference))
    cfg = _config(tmp_path, tiny_models, "first")
    train(TrainConfig.load(cfg), max_steps=7)  # stops in the QA stage, at step 1 of 4
    candidate = export_run_candidate(str(cfg), str(tmp_path / "candidate"))
    weights = sorted(candidate.rglob("*.safetensors"))
    from safetensors.torch import load_file

    assert weights and all(t.dtype == torch.float16 for w in weights for t in load_file(str(w)).values())
    assert not list(candidate.rglob("trainer.pt"))  # no optimizer state
    fresh = json.loads(cfg.read_text())
    fresh["output_dir"] = str(tmp_path / "clone")  # nothing of the first run's directory on the new machine
    clone = tmp_path / "clone.json"
    clone.write_text(json.dumps(fresh))
    from lclm_rag.training.candidate import read_candidate

    stored = LatentContextModel.from_pretrained(read_candidate(candidate)[0]).decoder.projector.latent_scale.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final = train(TrainConfig.load(clone), resume_from=candidate)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]  # the schedule is fast-forwarded quietly
    # the projector's latent statistics are the candidate's: a continued run does not calibrate afresh
    torch.testing.assert_close(LatentContextModel.from_pretrained(final).decoder.projector.latent_scale, stored)
    rows = [r for r in load_jsonl(tmp_path / "clone" / "log.jsonl") if r["type"] == "train"]
    whole = [r for r in load_jsonl(tmp_path / "whole" / "log.jsonl") if r["type"] == "train"]
    assert [r["global_step"] for r in rows] == list(range(1, 11))  # the candidate's log, then the steps it went on with
    assert [r["lr"] for r in rows] == pytest.approx([r["lr"] for r in whole])  # the same schedule
    assert [r["samples"] for r in rows] == [r["samples"] for r in whole]
    assert LatentContextModel.from_pretrained(final).config.decoder_lora
    with pytest.raises(Exception, match="not a run candidate"):
        train(TrainConfig.load(_config(tmp_path, tiny_models, "other")), resume_from=tmp_path)
