import pytest
import torch

from lclm_rag.config import LatentConfig
from lclm_rag.decoder import LatentDecoder
from lclm_rag.engine import GenerationSettings
from lclm_rag.errors import ConfigError, InputError


def test_text_slots_generate_exactly_like_input_ids(model, passages):
    dec = model.decoder
    segments = dec.qa_segments("Who designed the tower?", passages[:2])
    ids = [t for s in segments for t in s.token_ids]
    # the segments are the chat template's own tokenization of the whole prompt
    whole = dec.tokenizer.apply_chat_template(
        [{"role": "user", "content": dec.qa_user_message("Who designed the tower?", 0).replace("Question", "Context:\n[1] " + passages[0] + "\n[2] " + passages[1] + "\n\nQuestion")}],
        tokenize=False, add_generation_prompt=True,
    )
    assert dec.tokenizer.decode(ids) == whole
    assert ids == dec.text_ids(whole)  # expanded passages are tokenized inline, with what surrounds them
    with torch.no_grad():
        ref = dec.model.generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            **dec.engine._kwargs(GenerationSettings(max_new_tokens=24)),
        )[0, len(ids):]
    expected = dec.tokenizer.decode(ref, skip_special_tokens=True).strip()
    assert dec.generate_from_segments([segments], max_new_tokens=24) == [expected]
    assert len(expected) > 0


def test_latent_slot_occupies_n_plus_two_positions(model, passages):
    latents = model.compress(passages[:2])
    segments = model.decoder.qa_segments("What is the capital?", latents)
    latent_segments = [s for s in segments if s.latents is not None]
    assert [s.positions for s in latent_segments] == [latents[0].shape[0] + 2, latents[1].shape[0] + 2]
    embeds = model.decoder.embed(segments)
    assert embeds.shape == (model.prompt_positions(segments), model.config.decoder_hidden_size)


def test_batch_matches_single_and_stream_matches_generate(model, passages):
    latents = model.compress(passages[:2])
    questions = ["Who designed the tower?", "What is the capital of France?"]
    contexts = [[latents[0], passages[2]], [passages[1]]]
    batch = model.answer(questions, contexts, max_new_tokens=16)
    singles = [model.answer(q, c, max_new_tokens=16) for q, c in zip(questions, contexts)]
    assert batch == singles
    streamed = "".join(model.stream(questions[1], contexts[1], max_new_tokens=16)).strip()
    assert streamed == singles[1]


def test_sampling_is_seeded_and_bounded(model, passages):
    def sample(seed: int) -> str:
        torch.manual_seed(seed)
        return model.answer("Where is the tower?", [passages[0]], max_new_tokens=8, do_sample=True, temperature=1.5)

    first = sample(0)
    assert first and sample(0) == first  # the same seed gives the same answer
    assert len(model.decoder.text_ids(first)) <= 8 + 1  # the budget holds (+1: decoding may split a word)
    assert len({sample(s) for s in range(1, 5)} | {first}) > 1  # and sampling does sample


def test_errors(model, decoder_parts):
    with pytest.raises(InputError, match="question is empty"):
        model.answer("  ", [])
    width = model.config.encoder_hidden_size
    with pytest.raises(ConfigError, match=f"width 100 but the projector expects {width}"):
        model.answer("q?", [torch.zeros(3, 100)])
    with pytest.raises(InputError, match="give latents"):
        model.answer("q?", [42])
    with pytest.raises(InputError, match="not finite"):
        model.answer("q?", [torch.full((3, width), float("nan"))])
    cfg = LatentConfig(boundary="tokens", encoder_hidden_size=width)
    with pytest.raises(ConfigError, match="not in the decoder tokenizer"):
        LatentDecoder(cfg, model=decoder_parts[0], tokenizer=decoder_parts[1])
    cfg = LatentConfig(encoder_hidden_size=width, decoder_hidden_size=1024)
    with pytest.raises(ConfigError, match="decoder_hidden_size=1024"):
        LatentDecoder(cfg, model=decoder_parts[0], tokenizer=decoder_parts[1])


@pytest.mark.slow
def test_repetition_penalty_and_top_k_reach_generation(packaged_model, passages):
    model = packaged_model  # a trained decoder, which repeats itself greedily on this prompt
    question, slots = "Describe the tower in detail.", [passages[0]]
    plain = model.answer(question, slots, max_new_tokens=24)
    assert model.answer(question, slots, max_new_tokens=24, repetition_penalty=1.0) == plain  # 1.0 is no penalty
    words = plain.split()
    assert len(set(words)) < len(words), plain  # greedy decoding repeats itself here ...
    penalised = model.answer(question, slots, max_new_tokens=24, repetition_penalty=50.0)
    assert penalised != plain  # ... and the penalty changes that
    torch.manual_seed(0)
    top1 = model.answer(question, slots, max_new_tokens=6, do_sample=True, temperature=5.0, top_k=1)
    assert top1 == model.answer(question, slots, max_new_tokens=6)  # top_k=1 sampling is greedy


def test_prompt_templates_and_a_system_turn(model, passages):
    import dataclasses

    from lclm_rag.prompt import slot_marker

    dec = model.decoder
    latents = model.compress(passages[:1])[0]
    assert dec.qa_user_message("Who?", 2).startswith(model.config.qa_instruction)  # ours
    lclm = dataclasses.replace(model.config, prompt_template="lclm")
    custom = dataclasses.replace(model.config, prompt_template="Passages:\n{context}\nQ: {question}\nA:", system_message="Be brief.")
    try:
        dec.config = lclm
        assert dec.qa_user_message(" Who? ", 2) == slot_marker(0) + slot_marker(1) + "\nWho?"
        dec.config = custom
        assert dec.qa_user_message("Who?", 2) == f"Passages:\n[1] {slot_marker(0)}\n[2] {slot_marker(1)}\nQ: Who?\nA:"
        segments = dec.qa_segments("Who?", [latents])
        first = dec.tokenizer.decode(segments[0].token_ids)
        assert "Be brief." in first and first.index("Be brief.") < first.index("Passages:")
        assert [s.latents is not None for s in segments] == [False, True, False]
    finally:
        dec.config = model.config
    with pytest.raises(ConfigError, match="prompt_template must be one of"):
        LatentConfig(prompt_template="Context: {passages}")


def test_teacher_forcing_on_target_positions_only_equals_the_loss_over_every_position(model, passages):
    """Logits are computed only where a target token is predicted; loss, hits and gradients match the full projection."""
    dec = model.decoder
    latents = model.compress(passages[:3])
    prompts = [dec.embed(dec.segments("Say it again.", [lat])).detach().requires_grad_() for lat in latents]
    targets = [passages[0], "Paris.", passages[3]]  # different prompt and target lengths: right padding in between

    def reference():  # every position through the vocabulary projection, then the target positions picked
        table, eos = dec.model.get_input_embeddings(), dec.tokenizer.eos_token_id
        losses, hits = [], []
        for prompt, target in zip(prompts, targets):
            tgt = torch.tensor(dec.text_ids(target) + [eos])
            logits = dec.model(inputs_embeds=torch.cat([prompt, table(tgt)])[None]).logits[0, prompt.shape[0] - 1 : -1]
            losses.append(torch.nn.functional.cross_entropy(logits, tgt))
            hits.append(logits.argmax(-1) == tgt)
        return torch.stack(losses).mean(), hits

    loss, per_token = dec.teacher_forced(prompts, targets, per_token=True)
    grads = torch.autograd.grad(loss, prompts)  # what reaches the projector and the encoder
    ref_loss, ref_hits = reference()
    ref_grads = torch.autograd.grad(ref_loss, prompts)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for g, ref_g in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref_g, atol=1e-6, rtol=1e-4)
    assert [h.tolist() for h in per_token] == [h.tolist() for h in ref_hits]
    _, correct, total = dec.teacher_forced(prompts, targets)
    assert (correct, total) == (sum(int(h.sum()) for h in ref_hits), sum(len(h) for h in ref_hits))


def _question_rows_mass(model, segments) -> torch.Tensor:
    """The skim computed directly: one full prefill, attention of every position after the last passage."""
    spans, pos = [], 0
    for seg in segments:
        if seg.latents is not None:
            spans.append((pos, pos + seg.positions))
        pos += seg.positions
    base = model.decoder.model
    previous = base.config._attn_implementation
    base.set_attn_implementation("eager")
    try:
        out = model.decoder.model(inputs_embeds=model.decoder.embed(segments)[None], output_attentions=True, use_cache=False)
    finally:
        base.set_attn_implementation(previous)
    rows = torch.stack([a[0, :, spans[-1][1]:, :] for a in out.attentions]).float().mean((0, 1, 2))
    return torch.stack([rows[a:b].sum() for a, b in spans])


def test_the_skim_reuses_the_passages_cache_and_subtracts_the_content_free_question(model, passages):
    from lclm_rag.prompt import CONTENT_FREE_QUESTION

    with torch.no_grad():
        latents = model.compress(passages)
        asked = model.decoder.qa_segments("Who designed the tower?", latents)
        content_free = model.decoder.qa_segments(CONTENT_FREE_QUESTION, latents)
        direct, baseline = _question_rows_mass(model, asked), _question_rows_mass(model, content_free)
    raw = torch.tensor(model.decoder.latent_attention(asked))
    torch.testing.assert_close(raw, direct, atol=1e-5, rtol=1e-4)
    assert raw.min() > 0 and raw.sum() < 1
    calibrated = torch.tensor(model.decoder.latent_attention(asked, content_free))
    torch.testing.assert_close(calibrated, direct - baseline, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(calibrated, raw)
    other = model.decoder.qa_segments(CONTENT_FREE_QUESTION, latents[::-1])
    with pytest.raises(InputError, match="must share everything up to the last passage"):
        model.decoder.latent_attention(asked, other)
    per_head = model.decoder.latent_attention(asked, content_free, per_head=True)
    layers, heads = model.decoder.model.config.num_hidden_layers, model.decoder.model.config.num_attention_heads
    assert per_head.shape == (layers, heads, len(passages))
    torch.testing.assert_close(per_head.mean((0, 1)), calibrated, atol=1e-6, rtol=1e-5)
