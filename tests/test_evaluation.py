import json
from pathlib import Path

import pytest
import torch

from lclm_rag.data import sample_records
from lclm_rag.errors import ConfigError, InputError
from lclm_rag.evaluation import (
    RAG_MODES,
    answer_contained,
    answer_kind,
    answer_position,
    evaluate_gold_passage,
    exact_match,
    f1_score,
    normalize_answer,
    paired_comparison,
    restoration_accuracy,
    restoration_breakdown,
    run_rag_eval,
    score_predictions,
)
from lclm_rag.evaluation.plots import plot_quality_cost
from lclm_rag.evaluation.restoration import token_classes

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"

RECORDS = [
    {"context": "The Eiffel Tower is named after the engineer Gustave Eiffel.", "question": "Who is the Eiffel Tower named after?", "answers": ["Gustave Eiffel"]},
    {"context": "Paris is the capital of France.", "question": "What is the capital of France?", "answers": ["Paris"]},
]


def test_squad_metrics():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("the Gustave Eiffel.", ["Gustave Eiffel"]) == 1.0
    assert exact_match("Eiffel", ["Gustave Eiffel"]) == 0.0
    assert f1_score("Gustave", ["Gustave Eiffel"]) == pytest.approx(2 / 3)
    assert f1_score("nothing", ["Gustave Eiffel", "Eiffel"]) == 0.0
    assert answer_contained("It is named after Gustave Eiffel, an engineer", ["Gustave Eiffel"]) == 1.0
    assert answer_contained("an engineer", ["Gustave Eiffel"]) == 0.0


def test_gold_passage_modes_and_restoration_control(model):
    text, _ = evaluate_gold_passage(model, RECORDS, "text", max_new_tokens=16)
    none, _ = evaluate_gold_passage(model, RECORDS, "none", max_new_tokens=16)
    assert text.n == 2 and text.answer_contained >= none.answer_contained
    assert text.mean_answer_words > 0 and text.seconds_per_question > 0
    latent, preds = evaluate_gold_passage(model, RECORDS, "latent-control", max_new_tokens=4)
    assert len(preds) == 2
    with pytest.raises(ValueError, match="unknown mode"):
        evaluate_gold_passage(model, RECORDS, "oracle")
    contexts = [r["context"] for r in RECORDS]
    breakdown = restoration_breakdown(model, contexts)
    assert breakdown["all"]["total"] == sum(len(model.decoder.text_ids(c)) + 1 for c in contexts)  # every token and EOS
    assert restoration_accuracy(model, contexts) == breakdown["all"]["accuracy"]
    assert breakdown["digit"]["total"] == 0 and breakdown["capitalised"]["total"] >= 7  # The Eiffel Tower Gustave Eiffel Paris France
    control = restoration_breakdown(model, contexts, control=True)
    assert control["all"]["total"] == breakdown["all"]["total"]  # same targets, other latents


def test_token_classes_mark_digits_and_capitalised_words(model):
    text = "Built in 1889 by Gustave Eiffel, it stands."
    classes = token_classes(model.decoder.tokenizer, text)
    pieces = [model.decoder.tokenizer.decode([i]) for i in model.decoder.text_ids(text)]
    assert len(classes) == len(pieces) + 1 and classes[-1] == {"all"}  # EOS last
    digits = "".join(p for p, c in zip(pieces, classes) if "digit" in c).replace(" ", "")
    capitalised = "".join(p for p, c in zip(pieces, classes) if "capitalised" in c).replace(" ", "")
    assert digits == "1889" and capitalised == "BuiltGustaveEiffel,"


def test_answer_diagnostics():
    records = [{"context": "It opened in 1889 in Paris.", "question": "When?", "answers": ["1889"]},
               {"context": "It opened in 1889 in Paris.", "question": "Where?", "answers": ["Paris"]},
               {"context": "It opened in 1889 in Paris.", "question": "What?", "answers": ["a tower"]}]
    scores = score_predictions("latent", ["1898", "Paris", "tower"], records, 1.0)
    assert scores.not_in_passage == pytest.approx(2 / 3)  # "1898" and "tower" occur nowhere in the passage
    assert (scores.numeric_n, scores.numeric_em) == (1, 0.0)
    assert (scores.capitalised_n, scores.capitalised_em) == (1, 1.0)


@pytest.fixture(scope="session")
def model_r8(make_compressor, decoder_parts):
    from lclm_rag.decoder import LatentDecoder
    from lclm_rag.model import LatentContextModel

    compressor = make_compressor(ratio=8)
    decoder = LatentDecoder(compressor.config, model=decoder_parts[0], tokenizer=decoder_parts[1])
    return LatentContextModel(compressor.config, compressor=compressor, decoder=decoder).eval()


@pytest.mark.usefixtures("shared_data")
def test_rag_eval_runs_every_mode_on_the_same_questions_and_retrieval(tmp_path, model, model_r8):
    records = [json.loads(line) for line in (SHARED / "qa" / "squad_dev.jsonl").open().readlines()[:200:25]]
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "eval.json"
    result = run_rag_eval(data, [model, model_r8], RAG_MODES, limit=3, seed=1, top_k=2, max_new_tokens=3,
                          expand_policy=["lexical", "score"], auto_thresholds=[0.0, 1.0],
                          workdir=tmp_path / "work", output=out, progress=False)
    rows = {r["mode"]: r for r in result["scores"]}
    expand = [f"expand 1 of 2 ({p}) @1:{r}" for r in (4, 8) for p in ("lexical", "score")]
    auto = [f"auto < {t}: expand 1 (lexical) @1:{r}" for r in (4, 8) for t in (0, 1)]
    text_first = [f"text first ({p}) top-2" for p in ("lexical", "score")]
    assert list(rows) == ["none", "text top-2", "text top-2 (adapted decoder)", "latent 1:4 top-2", "latent 1:8 top-2",
                          *expand, *text_first, *auto, "LongLLMLingua top-2 @1:4 budget", "gold text", "gold latent 1:4", "gold latent 1:8"]
    assert [rows[m]["passages_expanded"] for m in ("none", "text top-2", "latent 1:4 top-2", expand[0])] == [0, 2, 0, 1]
    # no budget: text first reads every retrieved passage as text, with the adapted decoder
    assert result["predictions"][text_first[1]] == result["predictions"]["text top-2 (adapted decoder)"]
    # the share of questions whose gold passage went in as text: all retrieved ones when all are expanded
    assert rows["text top-2"]["gold_expanded"] == rows["text top-2"]["recall_at_k"]
    assert rows["latent 1:4 top-2"]["gold_expanded"] == 0 and rows["none"]["gold_expanded"] is None
    assert 0 <= rows[expand[0]]["gold_expanded"] <= rows["text top-2"]["gold_expanded"]
    for r in (4, 8):  # threshold 0 never expands (the latent answer), 1.0 always does (the expand answer)
        never, always = f"auto < 0: expand 1 (lexical) @1:{r}", f"auto < 1: expand 1 (lexical) @1:{r}"
        assert rows[never]["passages_expanded"] == 0 and rows[always]["passages_expanded"] == 1
        assert result["predictions"][never] == result["predictions"][f"latent 1:{r} top-2"]
        assert result["predictions"][always] == result["predictions"][f"expand 1 of 2 (lexical) @1:{r}"]
        assert rows[always]["prompt_positions"] == rows[f"expand 1 of 2 (lexical) @1:{r}"]["prompt_positions"]
    assert all(r["n"] == 3 and 0 < r["ttft_s"] <= r["total_s"] and r["peak_rss_mb"] > 100 for r in rows.values())
    assert all(len(p) == 3 for p in result["predictions"].values())
    recalls = {r["recall_at_k"] for m, r in rows.items() if m not in ("none", "gold text") and not m.startswith("gold latent")}
    assert len(recalls) == 1 and 0.0 <= recalls.pop() <= 1.0  # one retrieval for every retrieval mode
    text, r4, r8 = rows["text top-2"]["prompt_positions"], rows["latent 1:4 top-2"]["prompt_positions"], rows["latent 1:8 top-2"]["prompt_positions"]
    assert rows["none"]["prompt_positions"] < r8 < r4 < rows[expand[0]]["prompt_positions"] < text
    assert rows["LongLLMLingua top-2 @1:4 budget"]["prompt_positions"] < text
    assert rows["gold latent 1:4"]["prompt_positions"] < rows["gold text"]["prompt_positions"]
    assert json.loads(out.read_text())["scores"] == result["scores"]
    assert result["corpus_passages"]["1:4"] == result["corpus_passages"]["1:8"] >= len({r["context"] for r in records})
    plot_quality_cost(result, tmp_path / "pareto.png")
    plot_quality_cost(result, tmp_path / "positions.png", cost="prompt_positions")
    assert (tmp_path / "pareto.png").stat().st_size > 10_000 and (tmp_path / "positions.png").stat().st_size > 10_000
    # a re-run reuses the collections in workdir: nothing is ingested again
    again = run_rag_eval(data, [model], ["latent"], limit=3, seed=1, top_k=2, max_new_tokens=3, workdir=tmp_path / "work", progress=False)
    assert "written 0" in again["ingested"]["1:4"]
    assert again["predictions"]["latent 1:4 top-2"] == result["predictions"]["latent 1:4 top-2"]


@pytest.mark.usefixtures("shared_data")
def test_rag_eval_resumes_an_interrupted_run(tmp_path, model):
    records = [json.loads(line) for line in (SHARED / "qa" / "squad_dev.jsonl").open().readlines()[:120:30]]
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "eval.json"
    kwargs = dict(limit=3, seed=2, top_k=2, max_new_tokens=3, workdir=tmp_path / "work", output=out, progress=False)
    full = run_rag_eval(data, [model], ["none", "latent"], save_every=1, **kwargs)
    # the file as a run stopped after the first question of its second mode leaves it
    stopped = json.loads(out.read_text())
    label = "latent 1:4 top-2"
    preds = stopped["predictions"].pop(label)
    row = next(r for r in stopped["scores"] if r["mode"] == label)
    stopped["scores"].remove(row)
    stopped["partial"] = {label: {"preds": preds[:1], "ttft": [0.5], "total": [1.0], "positions": [row["prompt_positions"]],
                                  "hits": [1.0], "peak_rss_mb": 1.0}}
    out.write_text(json.dumps(stopped))
    resumed = run_rag_eval(data, [model], ["none", "latent"], resume=True, **kwargs)
    assert resumed["predictions"] == full["predictions"]  # greedy: the same answers, none asked twice
    assert resumed["scores"][0] == full["scores"][0]  # the finished mode is kept as it was
    assert resumed["scores"][1]["mode"] == label and resumed["scores"][1]["n"] == 3 and resumed["partial"] == {}
    assert json.loads(out.read_text())["scores"] == resumed["scores"]
    # another evaluation in the same file is refused and the file is left alone
    before = out.read_text()
    with pytest.raises(InputError, match="different evaluation.*seed"):
        run_rag_eval(data, [model], ["none"], resume=True, **dict(kwargs, seed=3))
    assert out.read_text() == before
    # a retrained reader (same compressor, so the same stored latents): only the modes that read it are redone
    marked = json.loads(before)
    marked["predictions"] = {k: ["kept"] * 3 for k in marked["predictions"]}
    out.write_text(json.dumps(marked))
    projector = model.decoder.projector
    saved = {k: v.clone() for k, v in projector.state_dict().items()}
    try:
        with torch.no_grad():
            projector.fc2.bias.add_(0.5)
        redone = run_rag_eval(data, [model], ["none", "latent"], resume=True, **kwargs)
    finally:
        projector.load_state_dict(saved)
    assert redone["predictions"]["none"] == ["kept"] * 3  # the base decoder's answers do not depend on the checkpoint
    assert redone["predictions"][label] != ["kept"] * 3 and redone["redone"] == [label]
    assert [r["mode"] for r in redone["scores"]] == ["none", label]
    assert json.loads(Path(f"{out}.previous.json").read_text()) == marked  # the replaced results are not lost


@pytest.mark.usefixtures("shared_data")
def test_rag_eval_expands_within_each_token_budget_and_resumes_with_more_policies(tmp_path, model):
    records = [json.loads(line) for line in (SHARED / "qa" / "squad_dev.jsonl").open().readlines()[:120:30]]
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    kwargs = dict(limit=3, seed=2, top_k=3, max_new_tokens=3, workdir=tmp_path / "work", output=tmp_path / "eval.json", progress=False)
    first = run_rag_eval(data, [model], ["latent", "expand"], expand_policy="lexical", **kwargs)
    rows = {r["mode"]: r for r in first["scores"]}
    budget = int(rows["latent 1:4 top-3"]["prompt_positions"]) + 40  # above the all-latent prompt, below the expansion
    result = run_rag_eval(data, [model], ["latent", "expand"], expand_policy=["lexical", "score"], token_budgets=[None, budget],
                          resume=True, **kwargs)
    rows = {r["mode"]: r for r in result["scores"]}
    assert list(rows) == ["latent 1:4 top-3", "expand 1 of 3 (lexical) @1:4", f"expand 1 of 3 (lexical) @1:4 within {budget} positions",
                          "expand 1 of 3 (score) @1:4", f"expand 1 of 3 (score) @1:4 within {budget} positions"]
    assert result["predictions"]["expand 1 of 3 (lexical) @1:4"] == first["predictions"]["expand 1 of 3 (lexical) @1:4"]
    assert "redone" not in result  # the finished modes were kept: adding policies and budgets is the same evaluation
    for policy in ("lexical", "score"):
        fitted = rows[f"expand 1 of 3 ({policy}) @1:4 within {budget} positions"]
        assert fitted["prompt_positions"] <= budget < rows[f"expand 1 of 3 ({policy}) @1:4"]["prompt_positions"]
        assert fitted["passages_expanded"] == 1  # the expansion stays; lower-ranked latents made room


def test_rag_eval_errors(tmp_path, model):
    with pytest.raises(InputError, match="token budgets must be positive"):
        run_rag_eval(tmp_path / "x.jsonl", [model], ["expand"], token_budgets=[0])
    with pytest.raises(InputError, match="resume continues the run saved in output"):
        run_rag_eval(tmp_path / "x.jsonl", [model], ["none"], resume=True)
    with pytest.raises(InputError, match="unknown modes"):
        run_rag_eval(tmp_path / "x.jsonl", [model], ["oracle"])
    with pytest.raises(InputError, match="expand policies must be some of"):
        run_rag_eval(tmp_path / "x.jsonl", [model], ["expand"], expand_policy=["bm25"])
    with pytest.raises(InputError, match=r"expand policies must be some of .*\(auto: bm25\)"):
        run_rag_eval(tmp_path / "x.jsonl", [model], ["auto"], auto_policy="bm25")
    with pytest.raises(InputError, match=r"auto thresholds must lie in \[0, 1\]"):
        run_rag_eval(tmp_path / "x.jsonl", [model], ["auto"], auto_thresholds=[1.5])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "c", "question": "q"}) + "\n")
    with pytest.raises(InputError, match="record 0 needs context, question and non-empty answers"):
        run_rag_eval(bad, [model], ["none"])
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"context": "c", "question": "q", "answers": ["a"]}) + "\n")
    with pytest.raises(ConfigError, match="the skim policy needs a fitted probe: this model has none"):  # before any ingestion
        run_rag_eval(good, [model], ["expand"], expand_policy=["lexical", "skim"], workdir=tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_a_sidecar_model_reads_its_key_terms_in_every_latent_mode_of_the_rag_eval(tmp_path, model):
    records = [json.loads(line) for line in (SHARED / "qa" / "squad_dev.jsonl").open().readlines()[:120:30]]
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    kwargs = dict(limit=2, seed=1, top_k=2, max_new_tokens=2, progress=False)
    plain = {r["mode"]: r for r in run_rag_eval(data, [model], ["latent", "gold-latent"], workdir=tmp_path / "plain", **kwargs)["scores"]}
    try:
        model.config.sidecar_terms = 3
        sidecar = {r["mode"]: r for r in run_rag_eval(data, [model], ["latent", "gold-latent"], workdir=tmp_path / "sidecar",
                                                      **kwargs)["scores"]}
    finally:
        model.config.sidecar_terms = 0
    for mode in ("latent 1:4 top-2", "gold latent 1:4"):  # the key terms after each passage's latents, counted
        assert sidecar[mode]["prompt_positions"] > plain[mode]["prompt_positions"] + 4


def test_paired_comparison_scores_each_question_against_the_same_question(tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = [{"context": f"c{i}", "question": f"q{i}", "answers": [f"answer {i}"]} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    order = [r["question"] for r in sample_records(data, 4, seed=3)]  # the order the results are in
    right = {q: f"answer {q[1:]}" for q in order}
    # new: right on the first 3 questions, old: right on the first only; both 2 words per answer
    new = {"data": str(data), "n": 4, "seed": 3, "predictions": {"latent": [right[q] if i < 3 else "no idea" for i, q in enumerate(order)]}}
    old = {"data": "elsewhere/qa.jsonl", "n": 4, "seed": 3, "predictions": {"text": [right[q] if i < 1 else "no idea" for i, q in enumerate(order)]}}
    rows = {r["metric"]: r for r in paired_comparison(new, old, mode="latent", old_mode="text")}
    em = rows["exact_match"]
    assert (em["new"], em["old"], em["difference"]) == (0.75, 0.25, 0.5)
    assert em["standard_error"] == pytest.approx(torch.tensor([0.0, 1, 1, 0]).std().item() / 2)
    assert rows["answer_words"]["difference"] == 0.0
    # not the same questions, a missing mode, an unfinished run: clear errors, nothing compared
    with pytest.raises(InputError, match="did not answer the same questions: seed 3 vs 4"):
        paired_comparison(new, {**old, "seed": 4}, mode="latent", old_mode="text")
    with pytest.raises(InputError, match="no predictions for mode 'latent'; it has \\['text'\\]"):
        paired_comparison(new, old)
    with pytest.raises(InputError, match="3 predictions for 4 questions"):
        paired_comparison(new, {**old, "predictions": {"text": ["x"] * 3}}, mode="latent", old_mode="text")


def test_a_paired_comparison_breaks_down_by_where_the_answer_sits_and_by_its_kind(tmp_path):
    filler = "x " * 30
    rows = [{"context": "Paris is first. " + filler * 2, "question": "q0", "answers": ["Paris"]},  # first third
            {"context": filler + "in 1889 " + filler, "question": "q1", "answers": ["1889"]},  # middle third
            {"context": filler * 2 + "it was red", "question": "q2", "answers": ["red"]},  # last third
            {"context": filler, "question": "q3", "answers": ["blue", "Navy"]},  # nowhere; kind by the first answer
            {"context": "Rome, then " + filler * 2, "question": "q4", "answers": ["rome"]}]  # case-blind; lower-case kind
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    order = sample_records(data, 5, seed=0)
    assert [answer_position(r) for r in rows] == ["first third", "middle third", "last third", "not in passage", "first third"]
    assert [answer_kind(r) for r in rows] == ["name", "number", "other", "other", "other"]
    new = {"data": str(data), "n": 5, "seed": 0, "predictions": {"latent": [r["answers"][0] for r in order]}}  # all right
    old = {"data": str(data), "n": 5, "seed": 0,  # right only where the answer is in the first third
           "predictions": {"lead": [r["answers"][0] if answer_position(r) == "first third" else "no" for r in order]}}
    table = {(r["answer-position"], r["metric"]): r for r in paired_comparison(new, old, "latent", "lead", by="answer-position")}
    assert [k for k in table] == [(g, m) for g in ("first third", "middle third", "last third", "not in passage")
                                  for m in ("answer_contained", "f1")]
    assert table["first third", "f1"]["n"] == 2 and table["first third", "f1"]["difference"] == 0.0
    assert table["middle third", "f1"]["n"] == 1 and table["middle third", "f1"]["difference"] == 1.0
    assert table["not in passage", "answer_contained"]["old"] == 0.0
    kinds = {(r["answer-kind"], r["metric"]): r["n"] for r in paired_comparison(new, old, "latent", "lead", by="answer-kind")}
    assert list(kinds)[::2] == [("number", "answer_contained"), ("name", "answer_contained"), ("other", "answer_contained")]
    assert kinds == {("name", "answer_contained"): 1, ("name", "f1"): 1, ("number", "answer_contained"): 1,
                     ("number", "f1"): 1, ("other", "answer_contained"): 3, ("other", "f1"): 3}
    with pytest.raises(InputError, match="unknown grouping 'length'; choose from answer-position, answer-kind"):
        paired_comparison(new, old, "latent", "lead", by="length")


def test_expansion_recall_counts_the_gold_passage_per_policy(tmp_path, model):
    from lclm_rag.evaluation.expansion import run_expansion_recall

    records = [json.loads(line) for line in (SHARED / "qa" / "squad_dev.jsonl").open().readlines()[:300:30]]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_expansion_recall(data, model, limit=6, top_k=3, counts=(1, 3), workdir=tmp_path / "w",
                                  output=tmp_path / "recall.json", progress=False)
    assert result["n"] == 6 and [r["policy"] for r in result["scores"]] == ["score", "lexical", "fused", "attention"]
    for row in result["scores"]:  # expanding all k finds the gold passage exactly when it was retrieved
        assert row["gold_in_top1"] <= row["gold_in_top3"] == pytest.approx(result["gold_retrieved"])
        assert row["gold_in_top3_when_retrieved"] == (1.0 if result["gold_retrieved"] else 0.0)
    assert json.loads((tmp_path / "recall.json").read_text())["scores"] == result["scores"]
    with pytest.raises(InputError, match="counts must lie in"):
        run_expansion_recall(data, model, top_k=3, counts=(4,), workdir=tmp_path / "w")


def test_equal_position_text_forms_take_no_more_positions_than_the_latents(model):
    records = [{"context": "The Eiffel Tower in Paris was built by Gustave Eiffel from 1887 to 1889 for the World's Fair, "
                           "and 6.91 million people visited it in 2015.", "question": "Who built it?", "answers": ["Gustave Eiffel"]}]
    latent, _ = evaluate_gold_passage(model, records, "latent", max_new_tokens=2)
    for mode in ("key-terms", "lead"):
        scores, preds = evaluate_gold_passage(model, records, mode, max_new_tokens=2)
        assert 0 < scores.passage_positions <= latent.passage_positions and len(preds) == 1
    sidecar, _ = evaluate_gold_passage(model, records, "latent+key-terms", max_new_tokens=2)
    control, _ = evaluate_gold_passage(model, records + RECORDS, "latent+key-terms-control", max_new_tokens=2)
    assert sidecar.passage_positions > latent.passage_positions + 10  # "Key terms: Eiffel Tower; Paris; ..."
    for mode in ("key-terms@sidecar", "lead@sidecar"):
        wide, _ = evaluate_gold_passage(model, records, mode, max_new_tokens=2)
        assert latent.passage_positions < wide.passage_positions <= sidecar.passage_positions
    assert control.n == 3
    opening, _ = evaluate_gold_passage(model, records, "latent+lead", max_new_tokens=2)  # the opening in the sidecar's place
    assert abs(opening.passage_positions - sidecar.passage_positions) <= 1
    assert evaluate_gold_passage(model, records + RECORDS, "latent+lead-control", max_new_tokens=2)[0].n == 3
