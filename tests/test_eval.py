import pytest

from lclm_rag.eval import answer_contained, evaluate_gold_passage, exact_match, f1_score, normalize_answer, restoration_accuracy

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
    acc = restoration_accuracy(model, [r["context"] for r in RECORDS])
    control = restoration_accuracy(model, [r["context"] for r in RECORDS], control=True)
    assert 0.0 <= acc <= 1.0 and 0.0 <= control <= 1.0
