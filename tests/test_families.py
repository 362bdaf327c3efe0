"""Squid / Dolphin and ARC-Encoder checkpoints, each written tiny and random in its family's own layout.

The reference computations below are written from each family's published code (Squid:
``modeling_dolphin.py``'s ``Qwen2ForMemoryOutput``, ``ContextEmbd``,
``get_token_embebddings_context`` and ``inference_instruct``; ARC-Encoder: ``forward_embedder``,
``TransformerBlock``, ``PoolingModule``/``split_integer``, ``apply_rotary_emb``, ``EmbProjector`` and
``EmbedAugPipeline.generate``), in the families' own weight layouts, not through this library.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from lclm_rag.errors import CheckpointError, ConfigError
from lclm_rag.model import LatentContextModel

QUESTION = "Who is the tower named after?"
GREEDY = 3  # tokens compared after the prompt


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Conversions are written under a fresh LCLM_RAG_HOME, never the user's."""
    monkeypatch.setenv("LCLM_RAG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _save_shards(state: dict, root, shards: int = 1) -> None:
    """``state`` as transformers writes it: one ``model.safetensors``, or shards and their index."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in state.items()}
    if shards == 1:
        save_file(state, str(root / "model.safetensors"))
        return
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        save_file(part, str(root / file))
        weight_map.update(dict.fromkeys(part, file))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _greedy(decoder, embeds: torch.Tensor, steps: int = GREEDY) -> list[int]:
    """Greedy tokens by re-running the whole prompt each step, as ``inference_instruct`` does."""
    table, out = decoder.get_input_embeddings(), []
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(decoder(inputs_embeds=embeds[None]).logits[0, -1].argmax()))
            embeds = torch.cat([embeds, table(torch.tensor(out[-1:]))])
    return out


# --------------------------------------------------------------------------- Squid / Dolphin
MEMORY = 32


def _write_tiny_squid(root, smol_path):
    """A random DolphinForCausalLM checkpoint: config.json (model_type dolphin, encoder_config), shards, tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen2Model

    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(smol_path)
    tok.add_tokens([f"[memory_{i}]" for i in range(MEMORY)], special_tokens=True)
    vocab = len(tok) + 16  # padded, as Qwen2's 151936 rows hold the added tokens
    encoder_config = {"_name_or_path": "Qwen/Qwen2-0.5B", "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                      "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                      "tie_word_embeddings": True, "vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0,
                      "use_sliding_window": False, "attn_implementation": None, "torch_dtype": "float32"}
    decoder_settings = {"hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                        "tie_word_embeddings": False, "vocab_size": vocab}
    enc = Qwen2Model(Qwen2Config(**{k: v for k, v in encoder_config.items() if k != "attn_implementation"})).eval()
    dec = Qwen2ForCausalLM(Qwen2Config(**decoder_settings)).eval()
    projection = torch.nn.Linear(64, 96)
    state = dict(dec.state_dict())
    state.update({f"model.context_encoder.encoder.model.{k}": v for k, v in enc.state_dict().items()})
    state.update({f"model.context_encoder.projector.context_projection.{k}": v.detach() for k, v in projection.state_dict().items()})
    _save_shards(state, root, shards=2)
    tok.save_pretrained(root)
    (root / "config.json").write_text(json.dumps({
        "architectures": ["DolphinForCausalLM"], "model_type": "dolphin", "encoder_config": encoder_config,
        "auto_map": {"AutoConfig": "configuration_dolphin.DolphinConfig", "AutoModelForCausalLM": "modeling_dolphin.DolphinForCausalLM"},
        "torch_dtype": "float32", **decoder_settings}))
    return enc, dec, tok, projection


def _squid_reference(enc, dec, tok, projection, context: str, question: str):
    """Squid's forward pass as its code writes it: memory states, prompt embeddings, logits."""
    ids = tok(context + "".join(f"[memory_{i}]" for i in range(MEMORY)), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = enc(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        pad = enc.config.eos_token_id  # Qwen2ForMemoryOutput: pad_token_id = eos_token_id
        start = int(torch.eq(ids, pad).int().argmax(-1) % ids.shape[-1]) - MEMORY
        memory = hidden[0, torch.arange(MEMORY) + start]
        context_emb = projection(memory)
        chunks = [tok(chunk).input_ids for chunk in f" <context>{question}".split("<context>")]
        input_ids = torch.tensor(chunks[0] + [-1] * MEMORY + chunks[1])
        embeds = dec.get_input_embeddings()(input_ids.clamp(min=0)).clone()  # -1 -> token 0
        mask = input_ids == -1
        for begin in torch.where(mask[:-1] < mask[1:])[0]:  # the position before the placeholders
            embeds[begin : begin + MEMORY] = context_emb
    return memory, embeds


def test_squid_checkpoint_latents_embeddings_and_greedy_tokens_match_its_code(tmp_path, smol_path, passages):
    enc, dec, tok, projection = _write_tiny_squid(tmp_path / "squid", smol_path)
    model = LatentContextModel.from_pretrained(tmp_path / "squid")
    c = model.config
    assert (c.pooling, c.memory_slots, c.projector_kind, c.boundary_sides, c.prompt_template) == ("memory", 32, "linear", "end", "squid")

    memory, expected = _squid_reference(enc, dec, tok, projection, passages[0], QUESTION)
    latents = model.compress([passages[0]])[0]
    assert latents.shape == (MEMORY, 64)
    torch.testing.assert_close(latents, memory, atol=1e-5, rtol=1e-5)
    ours = model.decoder.embed(model.decoder.qa_segments(QUESTION, [latents]))
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    reference = _greedy(dec, expected)
    with torch.no_grad():
        assert _greedy(model.decoder.model, ours) == reference
    answer = model.answer(QUESTION, [latents], max_new_tokens=GREEDY)
    assert answer == tok.decode(reference, skip_special_tokens=True).strip()
    assert model.decoder.model.get_input_embeddings().weight.shape[0] == len(tok) + 16
    print(f"squid: latents max |diff| {(latents - memory).abs().max():.2e}, embeddings {(ours - expected).abs().max():.2e}")


def test_equal_position_text_is_cut_to_a_one_boundary_familys_positions(tmp_path, smol_path, passages):
    from lclm_rag.evaluation.gold import evaluate_gold_passage

    _write_tiny_squid(tmp_path / "squid", smol_path)
    model = LatentContextModel.from_pretrained(tmp_path / "squid")
    records = [{"context": passages[0], "question": QUESTION, "answers": ["x"]}]
    latent, _ = evaluate_gold_passage(model, records, "latent", max_new_tokens=1)
    lead, _ = evaluate_gold_passage(model, records, "lead", max_new_tokens=1)
    assert latent.passage_positions == MEMORY + 1  # 32 memory embeddings and one boundary
    assert MEMORY - 1 <= lead.passage_positions <= latent.passage_positions


def test_squid_checkpoint_errors(tmp_path, smol_path):
    _write_tiny_squid(tmp_path / "squid", smol_path)
    raw = json.loads((tmp_path / "squid" / "config.json").read_text())
    (tmp_path / "squid" / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "encoder_config"}))
    with pytest.raises(CheckpointError, match="config.json has no encoder_config"):
        LatentContextModel.from_pretrained(tmp_path / "squid")


# --------------------------------------------------------------------------- ARC-Encoder
ARC_ARGS = {"dim": 64, "n_layers": 4, "head_dim": 16, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_batch_size": 1}
ARC_EMBEDDER = {"causal_embedder": False, "compress_rates": [-8], "n_truncated_layers": 1,
                "pooling_module": {"pool_type": "mean_pooled_queries", "where": "before"}, "trained_layers": 3,
                "train_embedding_mtx": True, "rec_tok": True, "cont_tok": True}


def _write_tiny_arc(root, smol_path, bridge_type="mlp"):
    """A random EmbedAugModel saved as PyTorchModelHubMixin does: config.json (its arguments), model.safetensors."""
    from transformers import AutoTokenizer

    torch.manual_seed(1)
    root.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(smol_path)
    args = {**ARC_ARGS, "vocab_size": len(tok)}
    dim, hd, heads, kv, hidden = 64, 16, 4, 2, 128
    state = {"embedder.tok_embeddings.weight": torch.randn(len(tok), dim) * 0.5}
    for i in range(args["n_layers"] - ARC_EMBEDDER["n_truncated_layers"]):
        p = f"embedder.layers.{i}."
        shapes = {"attention.wq": (heads * hd, dim), "attention.wk": (kv * hd, dim), "attention.wv": (kv * hd, dim),
                  "attention.wo": (dim, heads * hd), "feed_forward.w1": (hidden, dim), "feed_forward.w2": (dim, hidden),
                  "feed_forward.w3": (hidden, dim)}
        state.update({f"{p}{n}.weight": torch.randn(*s) * 0.15 for n, s in shapes.items()})
        state.update({f"{p}{n}.weight": 1 + 0.1 * torch.randn(dim) for n in ("attention_norm", "ffn_norm")})
    copies = 2 if bridge_type == "multi_module" else 1
    for j in range(copies):
        state[f"embedder.cont_tok.{j}.weight"] = torch.randn(1, dim)
        state[f"embedder.rec_tok.{j}.weight"] = torch.randn(1, dim)
        prefix = f"bridge_module.{j}." if copies == 2 else "bridge_module."
        state[f"{prefix}layer1.weight"] = torch.randn(32, dim) * 0.2
        state[f"{prefix}layer2.weight"] = torch.randn(96, 32) * 0.2
    _save_shards(state, root)
    (root / "config.json").write_text(json.dumps({
        "bridge_args": {"bridge_type": bridge_type, "in_dim": dim, "hidden_dim": 32, "out_dim": 96},
        "embedder_args": ARC_EMBEDDER, "empty_init": copies, "llms": [], "model_args": args}))
    return state, tok


def _tiny_llama_decoder(root, tok):
    """The stand-in for the frozen base decoder (Llama-3.1-8B): a tiny random Llama of width 96."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    dec = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                       tie_word_embeddings=False)).eval()
    dec.save_pretrained(root)
    tok.save_pretrained(root)
    return dec


def _fake_hub_cache(cache, repo: str, source) -> None:
    """``source``'s files as a hub cache snapshot of ``repo`` (what a download on a connected machine leaves)."""
    import shutil

    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    shutil.copytree(source, folder / "snapshots" / ("0" * 40))


@pytest.fixture
def llama_cache(tmp_path, smol_path, monkeypatch):
    """A hub cache holding ``meta-llama/Llama-3.1-8B`` as the tiny decoder (and the tokenizer ARC's encoder reads)."""
    import huggingface_hub.constants
    from transformers import AutoTokenizer

    dec = _tiny_llama_decoder(tmp_path / "llama", AutoTokenizer.from_pretrained(smol_path))
    _fake_hub_cache(tmp_path / "hub", "meta-llama/Llama-3.1-8B", tmp_path / "llama")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return dec


def _split_integer(x: int, n: int) -> list[int]:
    """ARC's group sizes for a negative compression rate ``-n``."""
    base, remainder = divmod(x, n)
    if base == 0:
        return [x]
    if remainder == 0:
        return [n] * base
    out = (base + 1) * [x // (base + 1)]
    for i in range(x % (base + 1)):
        out[i] += 1
    return out


def _arc_reference(state, ids: list[int], ratio: int = 8):
    """ARC's forward_embedder in its own layout: interleaved (complex) rotary, bidirectional attention,
    mean-pooled queries before the last layer against every state, no final norm."""
    heads, kv, hd, eps = 4, 2, 16, 1e-5
    layers = ARC_ARGS["n_layers"] - ARC_EMBEDDER["n_truncated_layers"]
    freqs = 1.0 / (ARC_ARGS["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    cis = torch.polar(torch.ones(4096, hd // 2), torch.outer(torch.arange(4096).float(), freqs))

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rotate(x, c):
        z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(z * c[:, None, :]).flatten(-2)

    def block(i, x, other):
        p = f"embedder.layers.{i}."
        xq, xkv = norm(x, state[p + "attention_norm.weight"]), norm(other, state[p + "attention_norm.weight"])
        q = rotate((xq @ state[p + "attention.wq.weight"].T).view(len(x), heads, hd), cis[: len(x)])
        k = rotate((xkv @ state[p + "attention.wk.weight"].T).view(len(other), kv, hd), cis[: len(other)])
        v = (xkv @ state[p + "attention.wv.weight"].T).view(len(other), kv, hd)
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / hd**0.5, -1)
        h = x + torch.einsum("hqk,khd->qhd", att, v).reshape(len(x), -1) @ state[p + "attention.wo.weight"].T
        f = norm(h, state[p + "ffn_norm.weight"])
        w1, w2, w3 = (state[p + f"feed_forward.w{j}.weight"] for j in (1, 2, 3))
        return h + (F.silu(f @ w1.T) * (f @ w3.T)) @ w2.T

    h = state["embedder.tok_embeddings.weight"][ids]
    for i in range(layers - 1):
        h = block(i, h, h)
    pool = torch.block_diag(*[torch.ones(t) / t for t in _split_integer(len(ids), ratio)])
    return block(layers - 1, pool @ h, h)


def test_arc_checkpoint_latents_embeddings_and_greedy_tokens_match_its_code(tmp_path, smol_path, passages, llama_cache):
    state, tok = _write_tiny_arc(tmp_path / "ARC8_Encoder_Llama", smol_path)
    model = LatentContextModel.from_pretrained(tmp_path / "ARC8_Encoder_Llama")
    c = model.config
    assert (c.pooling, c.ratio, c.encoder_attention, c.projector_kind, c.boundary_sides) == ("pooled_queries", 8, "bidirectional", "factored", "end")
    assert c.decoder == "meta-llama/Llama-3.1-8B"  # the release's name says its decoder; the hub cache holds it

    texts = [passages[0], passages[1], passages[2]]  # 52, 7 and 39 tokens: balanced groups, one group, a batch
    all_latents = model.compress(texts)
    diffs = []
    for text, latents in zip(texts, all_latents):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expected = _arc_reference(state, ids)
        assert latents.shape == expected.shape == (-(-len(ids) // 8), 64)
        torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
        diffs.append(float((latents - expected).abs().max()))

    # the decoder's prompt, as EmbedAugPipeline.generate builds it: BOS + "Document: ", each passage's
    # latents then cont_tok through the bridge, "\nQuestion: ...\nAnswer:"
    latents = all_latents[:2]
    first = [tok.bos_token_id] + tok("Document: ", add_special_tokens=False)["input_ids"]
    last = tok(f"\nQuestion: {QUESTION}\nAnswer:", add_special_tokens=False)["input_ids"]
    table = llama_cache.get_input_embeddings()
    with torch.no_grad():
        comp = torch.cat([torch.cat([z, state["embedder.cont_tok.0.weight"]]) for z in latents])
        bridged = comp @ state["bridge_module.layer1.weight"].T @ state["bridge_module.layer2.weight"].T
        expected = torch.cat([table(torch.tensor(first)), bridged, table(torch.tensor(last))])
        ours = model.decoder.embed(model.decoder.qa_segments(QUESTION, latents))
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    reference = _greedy(llama_cache, expected)
    assert _greedy(model.decoder.model, ours) == reference
    assert model.answer(QUESTION, latents, max_new_tokens=GREEDY) == tok.decode(reference, skip_special_tokens=True).strip()
    print(f"arc: latents max |diff| {max(diffs):.2e}, embeddings {(ours - expected).abs().max():.2e}")


def test_arc_multi_checkpoint_reads_the_bridge_of_the_decoder_it_is_given(tmp_path, smol_path, llama_cache):
    state, tok = _write_tiny_arc(tmp_path / "ARC8_Encoder_multi", smol_path, bridge_type="multi_module")
    default = LatentContextModel.from_pretrained(tmp_path / "ARC8_Encoder_multi")  # llm_number 0, as ARC's code
    assert default.config.decoder == "meta-llama/Llama-3.1-8B"
    mistral = tmp_path / "mistral-7b-v0.3"  # another copy of the tiny decoder, named for the second decoder
    _tiny_llama_decoder(mistral, tok)
    model = LatentContextModel.from_pretrained(tmp_path / "ARC8_Encoder_multi", decoder=str(mistral))
    for m, j in ((default, 0), (model, 1)):
        w1, w2 = state[f"bridge_module.{j}.layer1.weight"], state[f"bridge_module.{j}.layer2.weight"]
        torch.testing.assert_close(m.decoder.projector.fc1.weight, w1)
        torch.testing.assert_close(m.decoder.boundary, state[f"embedder.cont_tok.{j}.weight"] @ w1.T @ w2.T, atol=1e-6, rtol=1e-5)
    assert model.fingerprint() == default.fingerprint()  # one encoder: the same stored latents for both decoders
    with pytest.raises(ConfigError, match="names neither"):
        LatentContextModel.from_pretrained(tmp_path / "ARC8_Encoder_multi", decoder=str(tmp_path / "qwen"))


def test_arc_checkpoint_errors(tmp_path, smol_path, llama_cache):
    _write_tiny_arc(tmp_path / "renamed", smol_path)
    with pytest.raises(ConfigError, match="its name does not say its decoder"):
        LatentContextModel.from_pretrained(tmp_path / "renamed")
    raw = json.loads((tmp_path / "renamed" / "config.json").read_text())
    raw["embedder_args"] = {**ARC_EMBEDDER, "causal_embedder": True}
    (tmp_path / "renamed" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="causal_embedder=True is not supported"):
        LatentContextModel.from_pretrained(tmp_path / "renamed", decoder="meta-llama/Llama-3.1-8B")


@pytest.mark.parametrize("repo", ["NexaAIDev/Squid", "kyutai/ARC8_Encoder_Llama", "kyutai/ARC8_Encoder_Mistral"])
def test_a_family_hub_id_offline_is_one_clear_error(monkeypatch, repo):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=f"'{repo}' is not in the local Hugging Face cache and HF_HUB_OFFLINE"):
        LatentContextModel.from_pretrained(repo)


# --------------------------------------------------------------------------- the command line
@pytest.mark.slow
@pytest.mark.parametrize("family", ["squid", "arc-encoder"])
def test_ingest_and_query_run_end_to_end_on_a_family_checkpoint(tmp_path, smol_path, capsys, family, llama_cache):
    from lclm_rag.cli import main
    from lclm_rag.rag import LatentRAG, QueryConfig
    from lclm_rag.store import LatentStore

    if family == "squid":
        checkpoint = tmp_path / "squid"
        _write_tiny_squid(checkpoint, smol_path)
    else:
        checkpoint = tmp_path / "ARC8_Encoder_Llama"
        _write_tiny_arc(checkpoint, smol_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "eiffel.txt").write_text("The Eiffel Tower is named after the engineer Gustave Eiffel. " * 3)
    (docs / "paris.txt").write_text("Paris is the capital of France.")
    store = tmp_path / "store"
    assert main(["ingest", str(docs), "--collection", "c", "--path", str(store), "--checkpoint", str(checkpoint), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "written 2" in out
    assert main(["query", QUESTION, "--collection", "c", "--path", str(store), "--checkpoint", str(checkpoint),
                 "--top-k", "2", "--expand", "1", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    model = LatentContextModel.from_pretrained(checkpoint)
    with LatentStore.open("c", path=store) as opened:
        assert opened.require(model.fingerprint()).fingerprint == model.fingerprint()
        answer = LatentRAG(model, opened, config=QueryConfig(top_k=2, max_new_tokens=2)).answer(QUESTION)
    passages = answer.metadata()["passages"]
    assert [p["latent_positions"] for p in passages] == [p.latents.shape[0] + 1 for p in answer.passages]  # one end boundary
