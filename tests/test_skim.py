import json
import shutil
from pathlib import Path

import pytest
import torch

from lclm_rag.errors import ConfigError, InputError
from lclm_rag.model import LatentContextModel
from lclm_rag.planning import Passage
from lclm_rag.policies import lexical_relevance, question_attention, rank_for_expansion
from lclm_rag.skim import SKIM_PROBE_FILE, SkimProbe, fit_listwise, skim_features

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _passages(model, texts, scores):
    return [Passage(str(i), t, s, lat) for i, (t, s, lat) in enumerate(zip(texts, scores, model.compress(texts)))]


def _heads(model, question, ps):
    return question_attention(model, question, [p.latents for p in ps])


def test_fit_listwise_learns_which_feature_marks_the_gold_passage():
    torch.manual_seed(0)
    features, gold = [], []
    for _ in range(300):
        x = torch.randn(5, 4)
        g = int(torch.randint(5, (1,)))
        x[g, 2] += 1.5  # feature 2 points at the gold passage, the others are noise
        features.append(x)
        gold.append([i == g for i in range(5)])
    w = fit_listwise(features[:200], gold[:200])
    assert int(w.abs().argmax()) == 2 and w[2] > 0
    held_out = sum(gold[i][int((features[i].double() @ w).argmax())] for i in range(200, 300)) / 100
    assert held_out > 0.6  # chance is 0.2
    with pytest.raises(InputError, match="no training question has its gold passage"):
        fit_listwise(features[:3], [[False] * 5] * 3)


def test_skim_features_are_every_head_then_standardised_bm25_and_score():
    heads = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 100  # layers, heads, passages
    x = skim_features(heads, [0.0, 1.0, 2.0, 3.0], [0.5, None, 0.5, 0.5])
    assert x.shape == (4, 2 * 3 + 2)
    assert torch.allclose(x[:, 0], heads[0, 0].double() * 10) and torch.allclose(x[:, 5], heads[1, 2].double() * 10)
    assert x[:, 6].mean().abs() < 1e-9 and x[:, 6].std(unbiased=False) == pytest.approx(1.0)
    assert x[1, 7] < x[0, 7] == x[2, 7]  # a missing score counts as 0
    assert skim_features(heads, [1.0] * 4, [0.3] * 4)[:, 6:].abs().sum() == 0  # no spread: no signal


def test_skim_policy_weighs_the_decoders_heads_bm25_and_score(model, passages):
    model = LatentContextModel(model.config, compressor=model.compressor, decoder=model.decoder)  # its probe goes with it
    ps = _passages(model, passages, [0.2, 0.9, 0.5, 0.1])
    question = "How high is Mount Everest in metres?"
    heads = _heads(model, question, ps)
    n_heads = heads.shape[0] * heads.shape[1]
    reader = model.decoder.fingerprint()
    only = {name: torch.zeros(n_heads + 2) for name in ("head", "bm25", "score")}
    only["head"][3], only["bm25"][-2], only["score"][-1] = 1.0, 1.0, 1.0
    one_head = heads.reshape(n_heads, -1)[3].tolist()
    expected = {"head": sorted(range(4), key=lambda i: -one_head[i]),
                "bm25": rank_for_expansion(question, ps, "lexical"), "score": [1, 2, 0, 3]}
    for name, weights in only.items():
        model.use_skim_probe(SkimProbe(weights, reader))
        assert rank_for_expansion(question, ps, "skim", model) == expected[name], name
    ps[2].latents = None  # text only: expanded anyway, so ranked first
    assert rank_for_expansion(question, ps, "skim", model)[0] == 2
    assert lexical_relevance(question, passages)[3] > 0
    with pytest.raises(InputError, match="the skim policy needs the model"):
        rank_for_expansion(question, ps, "skim")


def test_a_probe_is_saved_beside_its_checkpoint_and_refused_for_another_reader(tiny_checkpoint, tmp_path, passages):
    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    model = LatentContextModel.from_pretrained(checkpoint)
    assert model.directory == checkpoint and model.skim_probe is None
    with pytest.raises(ConfigError, match="the skim policy needs a fitted probe: this model has none"):
        model.require_skim_probe()
    ps = _passages(model, passages, [0.2, 0.9, 0.5, 0.1])
    n_heads = _heads(model, "q", ps).reshape(-1, 4).shape[0]
    probe = SkimProbe(torch.linspace(-1, 1, n_heads + 2), model.decoder.fingerprint(), '{"questions": {"x.jsonl": 3}}')
    assert probe.save_pretrained(checkpoint).name == SKIM_PROBE_FILE
    reloaded = LatentContextModel.from_pretrained(checkpoint)
    assert reloaded.skim_probe is not None
    loaded = reloaded.require_skim_probe()
    assert torch.equal(loaded.weights, probe.weights) and (loaded.reader, loaded.trained_on) == (probe.reader, probe.trained_on)
    assert sorted(rank_for_expansion("Where is the tower?", _passages(reloaded, passages, [0.2] * 4), "skim", reloaded)) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="fitted on reader 0123456789ab, not on this model's"):
        reloaded.use_skim_probe(SkimProbe(probe.weights, "0123456789abcdef"))
    saved = reloaded.save_pretrained(tmp_path / "saved")  # save_pretrained writes the probe with the checkpoint
    assert (saved / SKIM_PROBE_FILE).is_file()
    assert torch.equal(LatentContextModel.from_pretrained(saved).require_skim_probe().weights, probe.weights)
    with pytest.raises(ConfigError, match=f"reads {n_heads + 1} attention heads but this decoder has {n_heads}"):
        SkimProbe(torch.zeros(n_heads + 3), probe.reader).scores(_heads(model, "q", ps), [1.0] * 4, [0.1] * 4)


def test_fit_skim_probe_on_a_training_file(model, tmp_path):
    from lclm_rag.training.skim_probe import fit_skim_probe

    records = [json.loads(line) for line in (SHARED / "qa" / "squadshifts_new_wiki.jsonl").open().readlines()[:400:40]]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    probe = fit_skim_probe(model, [data], limit=6, top_k=3, workdir=tmp_path / "w", progress=False)
    heads = model.decoder.model.config
    assert probe.weights.shape == (heads.num_hidden_layers * heads.num_attention_heads + 2,)
    assert probe.reader == model.decoder.fingerprint()
    assert json.loads(probe.trained_on)["questions"] == {"train.jsonl": 6}
    cached = list((tmp_path / "w").glob("features_train_6_1_*.json"))
    assert len(cached) == 1 and len(json.loads(cached[0].read_text())) == 6
    again = fit_skim_probe(model, [data], limit=6, top_k=3, workdir=tmp_path / "w", progress=False)  # from the cache
    assert torch.allclose(again.weights, probe.weights)
    with pytest.raises(InputError, match="no such file"):
        fit_skim_probe(model, [tmp_path / "none.jsonl"], workdir=tmp_path / "w")


@pytest.mark.slow
def test_the_packaged_probe_finds_the_passage_that_holds_the_answer(packaged_model, answer_in_each_position):
    assert packaged_model.skim_probe is not None
    for position, texts in answer_in_each_position:
        ps = _passages(packaged_model, texts, [0.5] * 4)  # the retrieval score says nothing: BM25 and the heads decide
        assert rank_for_expansion("Who designed the tower in Paris?", ps, "skim", packaged_model)[0] == position
