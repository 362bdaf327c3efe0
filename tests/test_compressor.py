import math

import pytest
import torch

from lclm_rag.config import LatentConfig
from lclm_rag.errors import ConfigError, InputError


@pytest.mark.parametrize("ratio", [4, 8, 16, 3])
def test_latent_count_is_ceil_tokens_over_ratio(make_compressor, passages, ratio):
    comp = make_compressor(ratio=ratio)
    latents = comp.compress(passages)
    for text, lat in zip(passages, latents):
        n_tokens = len(comp.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert lat.shape == (math.ceil(n_tokens / ratio), comp.config.encoder_hidden_size)
        assert comp.num_latents(n_tokens) == lat.shape[0]


def test_mean_pooling_matches_direct_computation(make_compressor, passages):
    comp = make_compressor(ratio=4)
    ids = comp.tokenizer(passages[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hidden = comp.encoder(input_ids=torch.tensor([ids])).last_hidden_state[0]
    expected = torch.stack([hidden[i : i + 4].mean(0) for i in range(0, len(ids), 4)])
    torch.testing.assert_close(comp.compress(passages[:1])[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "memory"])
def test_batch_invariance(make_compressor, passages, pooling):
    torch.manual_seed(0)
    comp = make_compressor(ratio=4, pooling=pooling)
    batched = comp.compress(passages, batch_size=len(passages))
    for text, lat in zip(passages, batched):
        alone = comp.compress([text])[0]
        assert alone.shape == lat.shape
        assert (alone - lat).abs().max().item() < 1e-5


def test_long_passage_is_compressed_window_by_window(make_compressor, passages):
    comp = make_compressor(ratio=4, encoder_window=32)
    text = " ".join(passages)
    ids = comp.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 64
    latents = comp.compress([text])[0]
    assert latents.shape[0] == comp.num_latents(len(ids)) == 8 * (len(ids) // 32) + math.ceil(len(ids) % 32 / 4)
    first_window = comp.encode_ids([ids[:32]])[0]
    torch.testing.assert_close(latents[:8], first_window.detach(), atol=1e-5, rtol=1e-5)


def test_truncated_encoder_keeps_first_layers(encoder_parts):
    encoder, _ = encoder_parts
    assert len(encoder.layers) == 4 and encoder.config.num_hidden_layers == 4


def test_fingerprint_tracks_what_determines_latents(make_compressor):
    a, b = make_compressor(ratio=4), make_compressor(ratio=4)
    assert a.fingerprint() == b.fingerprint()
    assert make_compressor(ratio=8).fingerprint() != a.fingerprint()
    assert make_compressor(ratio=4, encoder_window=256).fingerprint() != a.fingerprint()
    torch.manual_seed(1)
    assert make_compressor(ratio=4, pooling="memory").fingerprint() != a.fingerprint()


def test_bad_input_errors(make_compressor):
    comp = make_compressor(ratio=4)
    with pytest.raises(InputError, match="passage 1 is empty"):
        comp.compress(["fine", "   "])
    with pytest.raises(InputError, match="passage 0 is int"):
        comp.compress([3])
    with pytest.raises(InputError, match="not a single string"):
        comp.compress("a single string")
    for ratio in (0, -4):
        with pytest.raises(ConfigError, match="ratio must be a positive integer"):
            LatentConfig(ratio=ratio)
    with pytest.raises(ConfigError, match="encoder_layers"):
        make_compressor(encoder_layers=0)


@pytest.mark.parametrize("pooling", ["mean", "concat"])
def test_bidirectional_attention_lets_a_later_token_change_an_earlier_latent(make_compressor, pooling):
    text = "The tower was finished in 1889 and painted red."
    other = "The tower was finished in 1889 and painted blue."
    for attention, changes in (("causal", False), ("bidirectional", True)):
        comp = make_compressor(ratio=4, pooling=pooling, encoder_attention=attention)
        a, b = comp.compress([text, other])
        first_diff = a.shape[0] - 1  # the passages differ only in their last word
        earlier = (a[: first_diff - 1] - b[: first_diff - 1]).abs().max().item()
        assert (earlier > 1e-4) is changes, (attention, earlier)


@pytest.mark.parametrize("pooling", ["concat", "mean"])
def test_bidirectional_latents_do_not_depend_on_the_batch(make_compressor, passages, pooling):
    comp = make_compressor(ratio=4, pooling=pooling, encoder_attention="bidirectional")
    batched = comp.compress(passages, batch_size=len(passages))
    for text, lat in zip(passages, batched):
        assert (comp.compress([text])[0] - lat).abs().max().item() < 1e-4


def test_concat_pooling_starts_as_mean_pooling_and_keeps_order_once_trained(make_compressor, passages):
    mean, concat = make_compressor(ratio=4), make_compressor(ratio=4, pooling="concat")
    for a, b in zip(mean.compress(passages), concat.compress(passages)):  # incl. each short last group
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    hidden = concat.config.encoder_hidden_size
    states = torch.randn(4, hidden)
    with torch.no_grad():
        concat.concat_pool.proj.weight.normal_(0, 0.02)
    assert (concat.concat_pool(states) - concat.concat_pool(states.flip(0))).abs().max().item() > 1e-3
    assert concat.concat_pool(states).shape == (1, hidden) and concat.concat_pool(states[:3]).shape == (1, hidden)


def test_encoder_options_are_part_of_the_fingerprint(make_compressor):
    base = make_compressor(ratio=4)
    bidirectional = make_compressor(ratio=4, encoder_attention="bidirectional")
    concat = make_compressor(ratio=4, pooling="concat")
    assert len({base.fingerprint(), bidirectional.fingerprint(), concat.fingerprint()}) == 3
    before = concat.fingerprint()
    with torch.no_grad():
        concat.concat_pool.proj.weight.add_(0.01)
    concat.reset_fingerprint()
    assert concat.fingerprint() != before  # trained pooling weights change the latents
    with pytest.raises(ConfigError, match="encoder_attention must be one of"):
        LatentConfig(encoder_attention="sideways")


def test_concat_pooling_and_attention_survive_save_and_load(tmp_path, tiny_models):
    from lclm_rag.model import LatentContextModel

    enc, dec = tiny_models
    model = LatentContextModel.from_config(LatentConfig(encoder=enc, decoder=dec, encoder_layers=None, pooling="concat",
                                                        encoder_attention="bidirectional"))
    with torch.no_grad():
        model.compressor.concat_pool.proj.weight.normal_(0, 0.05)
    model.compressor.reset_fingerprint()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = LatentContextModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.encoder_attention == "bidirectional" and loaded.config.pooling == "concat"
    assert loaded.fingerprint() == model.fingerprint()
    text = ["A short passage about the year 1735 and Gustave Eiffel."]
    torch.testing.assert_close(loaded.compress(text)[0], model.compress(text)[0])
