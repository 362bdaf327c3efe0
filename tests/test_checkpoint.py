import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from lclm_rag.compressor import LatentCompressor
from lclm_rag.config import LatentConfig
from lclm_rag.errors import CheckpointError, ConfigError
from lclm_rag.hub import lclm_home
from lclm_rag.model import LatentContextModel
from lclm_rag.projector import Projector

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def test_save_load_round_trip_is_bit_exact(tmp_path, passages):
    torch.manual_seed(0)
    cfg = LatentConfig(encoder_layers=2, pooling="memory", ratio=8, decoder_lora=LORA, encoder_lora=LORA)
    model = LatentContextModel.from_config(cfg).eval()
    with torch.no_grad():  # make every trained part non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path / "ckpt")
    assert not [w for w in caught if "config file" in str(w.message)], "saving must not ask the hub about the base model"
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["compressor.safetensors", "config.json", "decoder.safetensors", "decoder_lora", "encoder_lora", "projector.safetensors"]
    size = sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file())
    assert size < 25e6, "base weights must be referenced, never copied"
    for part, base in (("encoder_lora", cfg.encoder), ("decoder_lora", cfg.decoder)):
        adapter = json.loads((tmp_path / "ckpt" / part / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == base, "adapters name the model id, not this machine's cache"
        assert str(lclm_home()) not in (tmp_path / "ckpt" / part / "README.md").read_text()
    loaded = LatentContextModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.to_dict() == model.config.to_dict()
    a, b = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert loaded.fingerprint() == model.fingerprint()
    la, lb = model.compress(passages[:2]), loaded.compress(passages[:2])
    assert all(torch.equal(x, y) for x, y in zip(la, lb))
    seg = model.decoder.qa_segments("Where?", la)
    assert torch.equal(model.decoder.forward_logits(seg), loaded.decoder.forward_logits(seg))


def test_checkpoint_errors(tmp_path, model):
    with pytest.raises(CheckpointError, match="is neither a directory, a packaged checkpoint"):
        LatentContextModel.from_pretrained(tmp_path / "nope")
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "projector.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing projector.safetensors"):
        LatentContextModel.from_pretrained(tmp_path / "ckpt")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"ratio": 4, "colour": "red"}))
    with pytest.raises(ConfigError, match="unknown config keys"):
        LatentContextModel.from_pretrained(tmp_path / "bad")
    (tmp_path / "candidate" / "model").mkdir(parents=True)  # a training candidate holds its model one level down
    (tmp_path / "candidate" / "model" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="has no config.json \\(a training run or candidate: its model is '.*candidate/model'\\)"):
        LatentContextModel.from_pretrained(tmp_path / "candidate")


def test_projector_width_mismatch_is_named(tmp_path, model):
    from safetensors.torch import save_file

    model.save_pretrained(tmp_path / "ckpt")
    enc, dec = model.config.encoder_hidden_size, model.config.decoder_hidden_size
    save_file(Projector(enc, 1024).state_dict(), str(tmp_path / "ckpt" / "projector.safetensors"))
    with pytest.raises(ConfigError, match=f"projector {enc} -> {dec}"):
        model.decoder.load_trained(tmp_path / "ckpt")


# --------------------------------------------------------------------------- LCLM layout
def _write_tiny_lclm(root, smol_path, ratio=4, window=16):
    """A randomly initialised checkpoint in the published LCLM layout (tiny Qwen3 configs)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(0)
    enc_tok = AutoTokenizer.from_pretrained(smol_path)
    dec_tok = AutoTokenizer.from_pretrained(smol_path)
    dec_tok.add_special_tokens({"additional_special_tokens": ["<|memory_start|>", "<|memory_end|>", "<|memory|>"]})
    common = dict(intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False)
    enc = Qwen3Model(Qwen3Config(vocab_size=len(enc_tok), hidden_size=64, **common)).eval()
    dec = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(dec_tok), hidden_size=96, **common)).eval()
    enc.save_pretrained(root / "encoder")
    enc_tok.save_pretrained(root / "encoder")
    dec.save_pretrained(root / "decoder")
    dec_tok.save_pretrained(root / "decoder")
    adapter = Projector(64, 96, 96)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.1)
    (root / "adapter").mkdir()
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(root / "adapter" / "adapter.safetensors"))
    (root / "model_config.json").write_text(json.dumps({
        "compression_ratio": ratio, "encoder_window_size": window, "pooling": "mean",
        "encoder_mask_type": "causal", "boundary_overlap": 0, "adapter_type": "mlp"}))
    return enc, dec, dec_tok, adapter.state_dict()


def test_lclm_checkpoint_latents_and_logits_match_direct_computation(tmp_path, smol_path, passages):
    enc, dec, dec_tok, adapter = _write_tiny_lclm(tmp_path, smol_path)
    model = LatentContextModel.from_pretrained(tmp_path)
    assert (model.config.ratio, model.config.encoder_window, model.config.boundary) == (4, 16, "tokens")

    text = passages[0]  # ~40 tokens: three windows of 16
    ids = model.compressor.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        windows = [enc(input_ids=torch.tensor([ids[s:s + 16]])).last_hidden_state[0] for s in range(0, len(ids), 16)]
    expected = torch.cat([torch.stack([w[i:i + 4].mean(0) for i in range(0, len(w), 4)]) for w in windows])
    latents = model.compress([text])[0]
    assert latents.shape[0] == math.ceil(len(ids) / 4)
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)

    # logits: LCLM's own recipe -- <|memory_start|> + N x <|memory|> + <|memory_end|>, memory
    # positions overwritten by the adapter output, everything else plain token embeddings
    segments = model.decoder.qa_segments("What is it?", [latents])
    rendered = dec_tok.apply_chat_template(
        [{"role": "user", "content": model.decoder.qa_user_message("What is it?", 1)}], tokenize=False, add_generation_prompt=True
    )
    placeholder = "<|memory_start|>" + "<|memory|>" * latents.shape[0] + "<|memory_end|>"
    rendered = rendered.replace(rendered[rendered.index("\u2063"):rendered.rindex("\u2063") + 1], placeholder)
    full_ids = torch.tensor(dec_tok(rendered, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        x = F.rms_norm(latents, (64,), adapter["norm.weight"], eps=1e-6)
        projected = F.linear(F.gelu(F.linear(x, adapter["fc1.weight"], adapter["fc1.bias"])), adapter["fc2.weight"], adapter["fc2.bias"])
        embeds = dec.get_input_embeddings()(full_ids).clone()
        embeds[full_ids == dec_tok.convert_tokens_to_ids("<|memory|>")] = projected
        expected_logits = dec(inputs_embeds=embeds[None]).logits[0]
        logits = model.decoder.forward_logits(segments)
    assert logits.shape == expected_logits.shape
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    first_token = model.decoder.tokenizer.decode([int(expected_logits[-1].argmax())], skip_special_tokens=True).strip()
    assert model.answer("What is it?", [latents], max_new_tokens=1) == first_token  # greedy decoding reads the same logits


def test_the_lclm_prompt_template_gives_lclms_documented_prompt_embeddings(tmp_path, smol_path, passages):
    enc, dec, dec_tok, adapter = _write_tiny_lclm(tmp_path, smol_path)
    model = LatentContextModel.from_pretrained(tmp_path, prompt_template="lclm")
    latents = model.compress(passages[:2])
    question = "Where is the tower?"
    ours = model.decoder.embed(model.decoder.qa_segments(question, latents))
    # LCLM's README: the text to compress between <|memory_start|> and <|memory_end|> in the prompt;
    # its processor swaps each text for N <|memory|> placeholders that the adapter output overwrites
    content = "".join("<|memory_start|>" + "<|memory|>" * z.shape[0] + "<|memory_end|>" for z in latents) + "\n" + question
    rendered = dec_tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor(dec_tok(rendered, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        x = F.rms_norm(torch.cat(latents), (64,), adapter["norm.weight"], eps=1e-6)
        projected = F.linear(F.gelu(F.linear(x, adapter["fc1.weight"], adapter["fc1.bias"])), adapter["fc2.weight"], adapter["fc2.bias"])
        expected = dec.get_input_embeddings()(ids).clone()
        expected[ids == dec_tok.convert_tokens_to_ids("<|memory|>")] = projected
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)

def test_lclm_checkpoint_errors(tmp_path, smol_path):
    _write_tiny_lclm(tmp_path, smol_path)
    cfg = json.loads((tmp_path / "model_config.json").read_text())
    (tmp_path / "model_config.json").write_text(json.dumps({**cfg, "encoder_mask_type": "bidirectional"}))
    with pytest.raises(ConfigError, match="encoder_mask_type='bidirectional' is not supported"):
        LatentContextModel.from_pretrained(tmp_path)
    (tmp_path / "model_config.json").write_text(json.dumps(cfg))
    (tmp_path / "adapter" / "adapter.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing adapter/adapter.safetensors"):
        LatentContextModel.from_pretrained(tmp_path)


def test_packaged_checkpoints_load_at_their_ratio():
    from lclm_rag.checkpoint import packaged_checkpoints

    packaged = packaged_checkpoints()
    assert {"smollm2-135m-r4", "smollm2-135m-r8"} <= set(packaged)
    text = "The Eiffel Tower is named after the engineer Gustave Eiffel, whose company designed and built it."
    for name, ratio in (("smollm2-135m-r4", 4), ("smollm2-135m-r8", 8)):
        size = sum(p.stat().st_size for p in packaged[name].rglob("*") if p.is_file())
        assert size < 25 * 2**20, f"{name} ships {size / 2**20:.1f} MB"
        model = LatentContextModel.from_pretrained(name)
        assert model.config.ratio == ratio
        tokens = len(model.compressor.tokenize([text])[0])
        latents = model.compress([text])[0]
        assert latents.shape == (math.ceil(tokens / ratio), 576)
        # ingestion loads only the encoder side, by the same name: the same latents and fingerprint
        compressor = LatentCompressor.from_pretrained(name).eval()
        assert compressor.fingerprint() == model.fingerprint()
        torch.testing.assert_close(compressor.compress([text])[0], latents)


def test_from_pretrained_places_the_model_and_keeps_the_stored_fingerprint():
    fp32 = LatentContextModel.from_pretrained("smollm2-135m-r4")
    bf16 = LatentContextModel.from_pretrained("smollm2-135m-r4", dtype="bfloat16", device="cpu")
    assert (fp32.dtype, bf16.dtype) == (torch.float32, torch.bfloat16) and bf16.device.type == "cpu"
    assert bf16.compressor.encoder.get_input_embeddings().weight.dtype == torch.bfloat16
    assert bf16.fingerprint() == fp32.fingerprint()  # a float32 collection is read by the bf16 model
    latents = bf16.compress(["The Eiffel Tower is named after Gustave Eiffel."])[0]
    assert latents.dtype == torch.bfloat16 and latents.shape[1] == 576
    with pytest.raises(ConfigError, match="dtype must be a floating-point"):
        LatentContextModel.from_pretrained("smollm2-135m-r4", dtype="int8")


def test_a_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="'latent-context/0.6b-4b-LCLM-4x' is not in the local Hugging Face cache and HF_HUB_OFFLINE"):
        LatentContextModel.from_pretrained("latent-context/0.6b-4b-LCLM-4x")
