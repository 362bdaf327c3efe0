from lclm_rag.prompt import qa_message, restoration_message, slot_marker
from lclm_rag.sidecar import fit_key_terms, key_terms, sidecar_text

TEXT = ("The Eiffel Tower is on the Champ de Mars in Paris, France. It is named after Gustave Eiffel, whose "
        "company built it from 1887 to 1889. On 4 July 1990, 6.91 million people visited it; 42% were French. "
        "The tower is in Paris.")


def test_key_terms_are_names_dates_and_numbers_in_passage_order_without_repeats():
    assert key_terms(TEXT, limit=None) == ["Eiffel Tower", "Champ de Mars", "Paris", "France", "Gustave Eiffel", "1887",
                                           "1889", "4 July 1990", "6.91", "42%", "French"]
    assert key_terms(TEXT, limit=3) == ["Eiffel Tower", "Champ de Mars", "Paris"]
    assert key_terms("on October 16, 2012 in Miami, 4,530 yards") == ["October 16, 2012", "Miami", "4,530"]
    assert key_terms("it was quiet.") == [] and sidecar_text([]) == ""


def test_key_terms_fit_a_position_budget_by_whole_terms():
    def count(text: str) -> int:
        return len(text.split())

    assert fit_key_terms(TEXT, 7, count) == "Key terms: Eiffel Tower; Champ de Mars"
    assert fit_key_terms(TEXT, 6, count) == "Key terms: Eiffel Tower"
    assert count(fit_key_terms(TEXT, 100, count)) < 100 and fit_key_terms(TEXT, 1, count) == ""


def test_the_sidecar_follows_its_passage_in_every_prompt_form():
    message = qa_message("Answer.", "Who?", 2, notes=["Key terms: A", ""])
    assert f"[1] {slot_marker(0)} Key terms: A\n[2] {slot_marker(1)}\n" in message
    assert qa_message("Answer.", "Who?", 1, "lclm", notes=["Key terms: A"]).startswith(f"{slot_marker(0)} Key terms: A\n")
    assert restoration_message("Key terms: A").startswith(f"{slot_marker(0)} Key terms: A\n\n")
    assert qa_message("Answer.", "Who?", 1) == qa_message("Answer.", "Who?", 1, notes=[""])


def test_a_passages_sidecar_is_its_stored_terms_else_its_own_texts():
    from lclm_rag.sidecar import passage_sidecar

    text = "Gustave Eiffel built it in 1889 in Paris."
    assert passage_sidecar(text, {"key_terms": ["A", "B", "C"]}, 2) == "Key terms: A; B"
    assert passage_sidecar(text, None, 2) == "Key terms: Gustave Eiffel; 1889"
    assert passage_sidecar(text, {"key_terms": "not a list"}, 2) == "Key terms: Gustave Eiffel; 1889"  # a damaged field
    assert passage_sidecar("no names here", {}, 3) == ""


def test_a_term_never_runs_across_a_line_break():
    assert key_terms("# The Eiffel Tower\n\nThe Eiffel Tower stands in Paris.") == ["Eiffel Tower", "Paris"]
    assert key_terms("Gustave Eiffel of Paris\nBuilt It") == ["Gustave Eiffel of Paris", "Built It"]
