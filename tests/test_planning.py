import pytest

from lclm_rag.errors import InputError
from lclm_rag.planning import Passage, build_segments, decide_expansion, plan_prompt, prefill_cost
from lclm_rag.policies import lexical_relevance, rank_for_expansion
from lclm_rag.prompt import latent_positions
from lclm_rag.query_config import QueryConfig
from lclm_rag.rag import LatentRAG


def _passages(model, texts, scores):
    return [Passage(str(i), t, s, lat) for i, (t, s, lat) in enumerate(zip(texts, scores, model.compress(texts)))]


def test_rankings(model, passages):
    ps = _passages(model, passages, [0.2, 0.9, 0.5, 0.1])
    assert rank_for_expansion("q", ps, "score") == [1, 2, 0, 3]
    assert rank_for_expansion("How high is Mount Everest in metres?", ps, "lexical")[0] == 3
    assert lexical_relevance("chloroplasts chlorophyll", passages)[2] > 0 == lexical_relevance("chloroplasts chlorophyll", passages)[0]
    with pytest.raises(InputError, match="expand policy"):
        rank_for_expansion("q", ps, "random")


def test_fused_ranking_weighs_exact_words_against_the_retrieval_score(model, passages):
    question = "How high is Mount Everest in metres?"  # BM25 finds passage 3 alone
    close = _passages(model, passages, [0.50, 0.52, 0.51, 0.49])  # dense scores that barely differ: BM25 decides
    assert rank_for_expansion(question, close, "fused")[0] == 3
    apart = _passages(model, passages, [0.1, 0.9, 0.1, 0.1])  # one passage far ahead on the dense score
    assert rank_for_expansion(question, apart, "lexical")[0] == 3
    assert rank_for_expansion(question, apart, "fused")[:2] == [3, 1]  # BM25's pick still leads, the dense favourite next
    assert rank_for_expansion("zzz", apart, "fused") == rank_for_expansion("zzz", apart, "score")  # no word in common: the dense order


def test_expand_and_token_budget(model, passages):
    ps = _passages(model, passages, [0.2, 0.9, 0.5, 0.1])
    question = "What is the capital of France?"
    skim = plan_prompt(model, question, ps, expand=0)
    build_segments(model, question, ps, skim)
    one = plan_prompt(model, question, ps, expand=1)
    segs = build_segments(model, question, ps, one)
    assert one.expanded == {1}
    assert sum(s.latents is not None for s in segs) == 3  # the other three stay latents
    assert any(passages[1] in model.decoder.tokenizer.decode(s.token_ids) for s in segs if s.token_ids)  # expanded: its text
    assert one.prompt_positions == model.prompt_positions(segs) == model.decoder.embed(segs).shape[0]
    text_len = len(model.decoder.text_ids(passages[1]))
    # inline tokenization may merge a token across the passage's edges
    assert abs(one.prompt_positions - skim.prompt_positions - (text_len - latent_positions(ps[1].latents.shape[0]))) <= 2

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


def test_a_budget_drops_the_lowest_ranked_latents_to_make_room_for_the_expansion(model, passages):
    ps = _passages(model, passages, [0.9, 0.2, 0.5, 0.1])  # score order 0, 2, 1, 3; passage 0 the longest text
    question = "Who designed the tower?"
    skim, one = plan_prompt(model, question, ps), plan_prompt(model, question, ps, expand=1)
    for plan in (skim, one):
        build_segments(model, question, ps, plan)
    budget = one.prompt_positions - 1  # everything with the best as text no longer fits
    fitted = plan_prompt(model, question, ps, expand=1, token_budget=budget)
    build_segments(model, question, ps, fitted)
    assert fitted.expanded == {0} and fitted.dropped == {3} and fitted.prompt_positions <= budget
    assert plan_prompt(model, question, ps, expand=0, token_budget=budget).dropped == set()  # without expand: latents stay
    lexical = plan_prompt(model, "How high is Mount Everest in metres?", ps, expand=1, policy="lexical", token_budget=budget)
    assert lexical.expanded == {3} and 3 not in lexical.dropped  # the policy's best, though last by score, stays as text
    for tight in (skim.prompt_positions, skim.prompt_positions - 20):  # always within the budget, the best kept
        squeezed = plan_prompt(model, question, ps, expand=1, token_budget=tight)
        build_segments(model, question, ps, squeezed)
        assert squeezed.prompt_positions <= tight and 0 not in squeezed.dropped


def test_the_text_first_plan_reads_the_best_passages_as_text_and_no_latents(model, passages):
    ps = _passages(model, passages, [0.9, 0.2, 0.5, 0.1])  # score order 0, 2, 1, 3
    question = "Who designed the tower?"
    whole = plan_prompt(model, question, ps, text_only=True)
    segs = build_segments(model, question, ps, whole)
    assert whole.expanded == {0, 1, 2, 3} and all(s.latents is None for s in segs)  # no budget: plain text RAG
    budget = model.prompt_positions(model.decoder.qa_segments(question, [ps[0].text, ps[2].text])) + 1
    fitted = plan_prompt(model, question, ps, token_budget=budget, text_only=True)
    segs = build_segments(model, question, ps, fitted)
    assert fitted.expanded == {0, 2} and fitted.dropped == {1, 3} and fitted.prompt_positions <= budget
    assert all(s.latents is None for s in segs)  # what did not fit as text is dropped, not read as latents
    no_latents = [Passage("x", passages[0], 0.9, None), *ps[1:]]
    assert 0 in plan_prompt(model, question, no_latents, token_budget=budget, text_only=True).expanded
    with pytest.raises(InputError, match="cannot hold even one passage as text"):
        plan_prompt(model, question, ps, token_budget=30, text_only=True)
    assert QueryConfig(expand="text").text_only and not QueryConfig(expand=2).text_only
    with pytest.raises(InputError, match="'auto' or 'text'"):
        QueryConfig(expand="texts")


def test_a_sidecar_model_reads_each_latent_passages_key_terms_and_the_plan_counts_them(model, passages):
    from lclm_rag.sidecar import key_terms, sidecar_text

    ps = _passages(model, passages, [0.9, 0.2, 0.5, 0.1])
    ps[1].payload = {"key_terms": ["Stored Term", "1889", "Third"]}  # as ingestion stored them
    question = "Who designed the tower?"
    plain = plan_prompt(model, question, ps, expand=1)
    plain_positions = model.prompt_positions(build_segments(model, question, ps, plain))
    try:
        model.config.sidecar_terms = 2
        plan = plan_prompt(model, question, ps, expand=1)
        segs = build_segments(model, question, ps, plan)
        prompt = "".join(model.decoder.tokenizer.decode(s.token_ids) for s in segs if s.token_ids is not None)
        assert plan.expanded == {0} and f"[1] {passages[0]}" in prompt and "Key terms" not in prompt.split("[2]")[0]
        assert "Key terms: Stored Term; 1889\n" in prompt  # the stored terms, cut to the model's count
        assert sidecar_text(key_terms(passages[2], 2)) in prompt  # no stored terms: its own text's
        assert plan.prompt_positions > plain_positions
        budget = plain.prompt_positions  # the latents alone would fit; with their sidecars they do not
        fitted = plan_prompt(model, question, ps, expand=1, token_budget=budget)
        assert fitted.dropped and model.prompt_positions(build_segments(model, question, ps, fitted)) <= budget
    finally:
        model.config.sidecar_terms = 0


def test_latency_budget_is_a_position_budget_at_the_measured_prefill_cost(model, passages):
    cost = prefill_cost(model)
    assert cost.per_position_s > 0 and cost.fixed_s >= 0 and prefill_cost(model) is cost  # measured once per engine
    ps = _passages(model, passages, [0.2, 0.9, 0.5, 0.1])
    question = "What is the capital of France?"
    skim = plan_prompt(model, question, ps)
    build_segments(model, question, ps, skim)
    seconds = cost.fixed_s + cost.per_position_s * (skim.prompt_positions + 30.5)
    by_latency = plan_prompt(model, question, ps, latency_budget_s=seconds)
    by_positions = plan_prompt(model, question, ps, token_budget=cost.positions_within(seconds))
    assert by_latency.expanded == by_positions.expanded and by_latency.dropped == by_positions.dropped
    assert plan_prompt(model, question, ps, latency_budget_s=1e6).expanded == {0, 1, 2, 3}
    both = plan_prompt(model, question, ps, token_budget=skim.prompt_positions + 2, latency_budget_s=1e6)
    assert both == plan_prompt(model, question, ps, token_budget=skim.prompt_positions + 2)  # the tighter budget holds
    with pytest.raises(InputError, match="latency_budget_s must be > 0"):
        plan_prompt(model, question, ps, latency_budget_s=0)


def test_a_question_longer_than_the_decoder_reads_is_refused(model, passages):
    ps = _passages(model, passages, [0.2, 0.9, 0.5, 0.1])
    words = model.decoder.max_positions  # at least one position a word
    with pytest.raises(InputError, match="decoder positions; the decoder reads"):
        plan_prompt(model, "why " * words, ps)


def test_attention_ranks_every_latent_passage_by_the_skim(model, passages):
    ps = _passages(model, passages, [0.2, 0.9, 0.5, 0.1])
    ps[2].latents = None  # text only: expanded anyway, so ranked first
    ranking = rank_for_expansion("Who designed the tower?", ps, "attention", model)
    assert ranking[0] == 2 and sorted(ranking) == [0, 1, 2, 3]
    segments = model.decoder.qa_segments("Who designed the tower?", [p.latents for p in ps if p.latents is not None])
    mass = model.decoder.latent_attention(segments)
    assert len(mass) == 3 and all(0 < m < 1 for m in mass) and sum(mass) < 1  # uncalibrated: shares of attention
    with pytest.raises(InputError, match="needs the model"):
        rank_for_expansion("q", ps, "attention")


@pytest.mark.slow
def test_attention_finds_the_passage_that_holds_the_answer(packaged_model, answer_in_each_position):
    for position, texts in answer_in_each_position:
        ps = _passages(packaged_model, texts, [0.5] * 4)
        assert rank_for_expansion("Who is the Eiffel Tower named after?", ps, "attention", packaged_model)[0] == position


def test_auto_expansion_follows_its_threshold(model, passages):
    ps = _passages(model, passages, [0.2, 0.9, 0.5, 0.1])
    question = "Who designed the tower?"
    answer = LatentRAG(model, config=QueryConfig(max_new_tokens=4)).generate
    for off in (None, 0.0):
        decision = decide_expansion(model, question, ps, threshold=off, answer=answer)
        assert not decision.expanded and not decision.plan.expanded and 0 < decision.confidence <= 1
    always = decide_expansion(model, question, ps, threshold=1.0, expand=2, policy="score", answer=answer)
    assert always.expanded and always.plan.expanded == {1, 2} and "threshold 1" in always.reason
    roomy = decide_expansion(model, question, ps, threshold=0.0, token_budget=10_000, answer=answer)
    assert not roomy.plan.expanded  # a budget that could hold every text still skims latents only
    assert decide_expansion(model, question, ps, threshold=1.0, expand=1, policy="score", token_budget=10_000,
                            answer=answer).plan.expanded == {1}
    with pytest.raises(InputError, match="threshold must be in"):
        decide_expansion(model, question, ps, threshold=1.5, answer=answer)


def test_answer_confidence_is_the_mean_token_probability(model, passages):
    segments = model.decoder.qa_segments("Who designed the tower?", model.compress(passages[:1]))
    answer = model.decoder.generate_from_segments([segments], max_new_tokens=3)[0]
    greedy = model.decoder.answer_confidence(segments, answer)
    assert 0 < greedy <= 1 and model.decoder.answer_confidence(segments, "zebra quantum") < greedy
