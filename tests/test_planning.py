import pytest

from lclm_rag.errors import InputError
from lclm_rag.planning import Passage, build_segments, lexical_relevance, plan_prompt, rank_for_expansion
from lclm_rag.prompt import latent_positions


def _passages(model, texts, scores):
    return [Passage(str(i), t, s, lat) for i, (t, s, lat) in enumerate(zip(texts, scores, model.compress(texts)))]


def test_rankings(model, passages):
    ps = _passages(model, passages, [0.2, 0.9, 0.5, 0.1])
    assert rank_for_expansion("q", ps, "score") == [1, 2, 0, 3]
    assert rank_for_expansion("How high is Mount Everest in metres?", ps, "lexical")[0] == 3
    assert lexical_relevance("chloroplasts chlorophyll", passages)[2] > 0 == lexical_relevance("chloroplasts chlorophyll", passages)[0]
    with pytest.raises(InputError, match="expand policy"):
        rank_for_expansion("q", ps, "random")


def test_expand_and_token_budget(model, passages):
    ps = _passages(model, passages, [0.2, 0.9, 0.5, 0.1])
    question = "What is the capital of France?"
    skim = plan_prompt(model, question, ps, expand=0)
    build_segments(model, question, ps, skim)
    one = plan_prompt(model, question, ps, expand=1)
    segs = build_segments(model, question, ps, one)
    assert one.expanded == {1}
    assert sum(s.latents is not None for s in segs) == 3  # the other three stay latents
    assert any(s.token_ids == model.decoder.text_ids(passages[1]) for s in segs)  # the expanded one is its text
    assert one.prompt_positions == model.prompt_positions(segs) == model.decoder.embed(segs).shape[0]
    text_len = len(model.decoder.text_ids(passages[1]))
    assert one.prompt_positions - skim.prompt_positions == text_len - latent_positions(ps[1].latents.shape[0])

    roomy = plan_prompt(model, question, ps, token_budget=10_000)
    assert roomy.expanded == {0, 1, 2, 3} and not roomy.dropped
    tight = plan_prompt(model, question, ps, token_budget=skim.prompt_positions + 30)
    build_segments(model, question, ps, tight)
    assert tight.prompt_positions <= skim.prompt_positions + 30 and not tight.dropped
    assert tight.expanded and tight.expanded <= {1, 2, 3}  # expands in score order as long as it fits
    squeezed = plan_prompt(model, question, ps, token_budget=skim.prompt_positions - 20)
    build_segments(model, question, ps, squeezed)
    assert squeezed.dropped and 1 not in squeezed.dropped and squeezed.prompt_positions <= skim.prompt_positions - 20
    with pytest.raises(InputError, match="cannot hold even one passage"):
        plan_prompt(model, question, ps, token_budget=10)
    with pytest.raises(InputError, match="never answers without context"):
        plan_prompt(model, question, [])


def test_a_question_longer_than_the_decoder_reads_is_refused(model, passages):
    ps = _passages(model, passages, [0.2, 0.9, 0.5, 0.1])
    words = model.decoder.max_positions  # at least one position a word
    with pytest.raises(InputError, match="decoder positions; the decoder reads"):
        plan_prompt(model, "why " * words, ps)
