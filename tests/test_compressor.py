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
