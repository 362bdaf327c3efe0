"""Distillation from a text reader: the KL to its distribution on each answer token (a stage's text_kl)."""

import dataclasses
import json

import pytest
import torch
from test_training import _config, _tiny_model_and_source, training_data  # noqa: F401 (a fixture)

from lclm_rag.data import load_jsonl
from lclm_rag.errors import ConfigError
from lclm_rag.training import TrainConfig, train
from lclm_rag.training.objectives import TrainingModule, kl_to_reference, target_log_probs
from lclm_rag.training.teacher import TextReaderLogProbs

pytestmark = pytest.mark.usefixtures("shared_data", "training_data")


def test_the_kl_to_a_reference_is_zero_on_itself_and_what_the_definition_gives():
    torch.manual_seed(0)
    logits, other = torch.randn(5, 11), torch.randn(5, 11)
    own = torch.log_softmax(logits, -1)
    assert kl_to_reference(logits, own).item() == pytest.approx(0.0, abs=1e-6)
    p, log_q = torch.softmax(other, -1), own
    expected = (p * (torch.log(p) - log_q)).sum(-1).mean()
    assert kl_to_reference(logits, torch.log_softmax(other, -1)).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="share a tokenizer"):
        kl_to_reference(logits, own[:, :10])


def test_the_text_reader_reads_the_passages_as_text_with_its_adapters_off(tmp_path, tiny_models):
    cfg, model, source = _tiny_model_and_source(tmp_path, tiny_models, mix_restoration=0.5)
    batch = [source.example(1, cfg.stages[1], i) for i in range(6)]
    assert {ex.task for ex in batch} == {"qa", "restoration"}
    with torch.no_grad():  # adapters that change what the decoder says (they start as the identity)
        for name, p in model.decoder.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.train()
    reference = TextReaderLogProbs(cfg, model, "cpu")(batch)
    assert model.decoder.training  # left as it was found
    dec = model.decoder
    for ex, ref in zip(batch, reference):
        if ex.task != "qa":
            assert ref is None
            continue
        with torch.no_grad(), dec.base():
            dec.eval()
            expected = target_log_probs(dec, [dec.segments(ex.user_message, ex.passages)], [ex.target])[0]
        with torch.no_grad():
            adapted = target_log_probs(dec, [dec.segments(ex.user_message, ex.passages)], [ex.target])[0]
        assert ref.shape == (len(dec.text_ids(ex.target)) + 1, expected.shape[-1])
        torch.testing.assert_close(ref, expected)
        assert not torch.allclose(ref, adapted, atol=1e-3)  # the adapters were off
    model.train()


def test_a_text_kl_step_adds_the_weighted_kl_of_each_qa_example(tmp_path, tiny_models):
    cfg, model, source = _tiny_model_and_source(tmp_path, tiny_models, mix_restoration=0.5)
    batch = [source.example(1, cfg.stages[1], i) for i in range(6)]
    reference = TextReaderLogProbs(cfg, model, "cpu")(batch)
    model.eval()  # no dropout: the same numbers on every forward
    module = TrainingModule(model, cache_latents=False)
    with torch.no_grad():
        plain, _, acc = module(batch, False)
        weighted, _, acc_kl = module(batch, False, reference=reference, kl_weight=0.5)
        latents = module.latents([p for ex in batch for p in ex.passages], False)
        cursor, kls = 0, []
        for ex, ref in zip(batch, reference):
            slots = latents[cursor : cursor + len(ex.passages)]
            cursor += len(ex.passages)
            if ref is not None:
                own = target_log_probs(model.decoder, [model.decoder.segments(ex.user_message, slots)], [ex.target])[0]
                kls.append(torch.nn.functional.kl_div(own, ref, log_target=True, reduction="batchmean").item())
    assert acc == acc_kl and len(kls) == sum(ex.task == "qa" for ex in batch) > 0
    assert weighted.item() == pytest.approx(plain.item() + 0.5 * sum(kls) / len(batch), rel=1e-4)
    assert weighted.item() > plain.item()


def test_a_recipe_with_text_kl_trains_and_its_loss_carries_the_kl(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match="text_kl must be a finite weight >= 0"):
        TrainConfig.from_dict({"output_dir": "x", "stages": [{"name": "qa", "steps": 1, "text_kl": -1}]})
    with pytest.raises(ConfigError, match="applies to a qa stage, not restoration"):
        TrainConfig.from_dict({"output_dir": "x", "stages": [{"name": "restoration", "steps": 1, "text_kl": 1.0}]})
    with pytest.raises(ConfigError, match="text_kl needs the unpadded step"):
        TrainConfig.from_dict({"output_dir": "x", "unpadded": False, "stages": [{"name": "qa", "steps": 1, "text_kl": 1.0}]})
    losses = {}
    for weight in (0.0, 1.0):
        cfg = TrainConfig.load(_config(tmp_path, tiny_models, f"kl{weight}", steps=(1, 2)))
        cfg.stages[1] = dataclasses.replace(cfg.stages[1], text_kl=weight, mix_restoration=0.0)
        assert train(cfg).name == "final"
        rows = [r for r in load_jsonl(tmp_path / f"kl{weight}" / "log.jsonl") if r["type"] == "train" and r["stage"] == "qa"]
        losses[weight] = rows[0]["loss"]
    assert losses[1.0] > losses[0.0]  # the same examples from the same weights: the KL is added
    assert json.loads((tmp_path / "kl1.0" / "train_config.json").read_text())["stages"][1]["text_kl"] == 1.0
