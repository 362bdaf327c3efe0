"""ARC-Encoder (arXiv 2510.20535, ``kyutai/ARC8_Encoder_{Llama,Mistral,multi}``): its checkpoint as our parts.

Facts read from kyutai-labs/ARC-Encoder (``embed_llm/models``: ``augmented_model.py``,
``enhanced_transformer.py``, ``transformer_layers.py``, ``embedding_modules.py``, ``args.py``,
``utils/rope.py``; ``configs/released_pt_configs/*.yaml``; ``generation/utils.py``):

- the hub release is a ``PyTorchModelHubMixin`` save of ``EmbedAugModel``: ``config.json`` holds
  its arguments (``model_args``, ``embedder_args``, ``bridge_args``) and ``model.safetensors`` its
  state, ``embedder.*`` and ``bridge_module.*``;
- the encoder is Llama-3.2-3B in Meta's own layout (``tok_embeddings``, ``layers.<i>.attention.w{q,k,v,o}``,
  ``feed_forward.w{1,2,3}``, ``attention_norm``, ``ffn_norm``) with its last ``n_truncated_layers``
  (2) dropped, interleaved rotary (Meta's complex form, ``rope_theta`` without Llama 3's
  scaling), bidirectional attention (``causal_embedder: false``) and no final norm;
- pooling ``mean_pooled_queries`` ``before`` the last layer with ``compress_rates: [-8]``
  (`lclm_rag.query_pooling`);
- the bridge (``bridge_type: mlp``) is ``layer1`` (3072 -> 2048) then ``layer2`` (2048 -> 4096),
  both bias-free, nothing between them; ``multi_module`` holds one per decoder (0: Llama-3.1-8B,
  1: Mistral-7B) and so does ``cont_tok``;
- after each passage's latents comes ``cont_tok`` (one learned vector of the encoder's width,
  projected by the bridge with them); the decoder is the unmodified base model, its QA prompt
  BOS + ``Document: `` + the passages side by side + ``\\nQuestion: {q}\\nAnswer:``.

In our parts: a Llama encoder (transformers' layout: the q and k rows permuted from the
interleaved to the half-split rotary form) with ``pooled_queries`` pooling, a ``factored``
projector, a learned end boundary equal to the bridge's image of ``cont_tok``, the ``arc``
template after BOS, and the decoder referenced by its hub id.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lclm_rag.config import LatentConfig
from lclm_rag.errors import CheckpointError, ConfigError
from lclm_rag.families.common import copy_tokenizer, load_tensors, require, save_projector

DECODERS = ("meta-llama/Llama-3.1-8B", "mistralai/Mistral-7B-v0.3")  # llm_number 0 and 1 of ARC8_Encoder_multi
TOKENIZERS = ("meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.1-8B")  # ARC's encoder reads the Llama 3 tokenizer
WINDOW = 2048  # ours: ARC encodes a whole text at once; longer passages are cut into windows of this size
LICENCE = "CC-BY-4.0 (the encoders), and the Llama 3.2 / Llama 3.1 / Mistral terms of the base models"
_NAME = re.compile(r"ARC\d+_Encoder_(Llama|Mistral|multi)", re.IGNORECASE)


def is_arc(raw: dict) -> bool:
    return isinstance(raw.get("embedder_args"), dict) and isinstance(raw.get("bridge_args"), dict)


def decoder_for(directory: Path, decoder: str | None, multi: bool) -> tuple[str, int]:
    """The decoder to read the latents with, and which of a multi-decoder checkpoint's bridges it takes.

    Given ``decoder`` wins (its name says Llama or Mistral for a multi checkpoint); otherwise the
    release's name (``ARC8_Encoder_Llama`` ...) says it, and a multi checkpoint takes its first
    decoder, as ARC's own code does by default (``llm_number=0``).
    """
    if decoder is not None:
        name = str(decoder).lower()
        index = 1 if "mistral" in name else 0
        if multi and "mistral" not in name and "llama" not in name:
            raise ConfigError(f"ARC-Encoder checkpoint {str(directory)!r} was trained for two decoders (0: Llama-3.1-8B, "
                              f"1: Mistral-7B): the decoder {decoder!r} names neither")
        return str(decoder), index
    found = _NAME.search(str(directory))
    kind = found.group(1).lower() if found else ("multi" if multi else None)
    if kind is None:
        raise ConfigError(f"ARC-Encoder checkpoint {str(directory)!r}: its name does not say its decoder; give it, e.g. "
                          f"LatentContextModel.from_pretrained(..., decoder={DECODERS[0]!r})")
    return DECODERS[1] if kind == "mistral" else DECODERS[0], 0


def check_settings(raw: dict, directory: Path) -> int:
    """Refuse what ARC's inference path does otherwise than the released encoders; return the ratio."""
    emb, bridge = raw["embedder_args"], raw["bridge_args"]
    pooling = emb.get("pooling_module") or {}
    rates = emb.get("compress_rates") or []
    checks = {
        "embedder_args.causal_embedder": (emb.get("causal_embedder", False), (False,)),
        "embedder_args.memory_tokens": (emb.get("memory_tokens", 0), (0,)),
        "embedder_args.pooling_module.pool_type": (pooling.get("pool_type", "mean_pooled_queries"), ("mean_pooled_queries",)),
        "embedder_args.pooling_module.where": (pooling.get("where", "before"), ("before",)),
        "embedder_args.cont_tok": (emb.get("cont_tok", False), (True,)),
        "bridge_args.bridge_type": (bridge.get("bridge_type"), ("mlp", "multi_module")),
    }
    for key, (value, supported) in checks.items():
        if value not in supported:
            raise ConfigError(f"ARC-Encoder checkpoint {str(directory)!r}: {key}={value!r} is not supported (supported: {supported})")
    if len(rates) != 1 or not isinstance(rates[0], int) or rates[0] >= -1:
        raise ConfigError(f"ARC-Encoder checkpoint {str(directory)!r}: compress_rates={rates!r} is not supported "
                          "(one pooling factor, as [-8])")
    return -rates[0]


def to_transformers(state: dict[str, torch.Tensor], heads: int, kv_heads: int) -> dict[str, torch.Tensor]:
    """Meta's layer names to transformers' Llama names; q and k rows from interleaved to half-split rotary."""
    def permute(w: torch.Tensor, n: int) -> torch.Tensor:
        rows, cols = w.shape
        return w.view(n, rows // n // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    out = {"embed_tokens.weight": state["tok_embeddings.weight"]}
    for key, value in state.items():
        match = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", key)
        if match is None or match.group(2) not in names:
            continue
        if match.group(2) == "attention.wq":
            value = permute(value, heads)
        elif match.group(2) == "attention.wk":
            value = permute(value, kv_heads)
        out[f"layers.{match.group(1)}.{names[match.group(2)]}.weight"] = value
    return out


def encoder_tokenizer(directory: Path) -> Path:
    """Where the Llama 3 tokenizer is: in the checkpoint folder, else Llama-3.2-3B or Llama-3.1-8B in the hub cache."""
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
        return directory
    from huggingface_hub import snapshot_download

    from lclm_rag.hub import is_offline

    patterns = ["tokenizer*", "special_tokens_map.json"]
    for repo in TOKENIZERS:
        try:
            path = Path(snapshot_download(repo, local_files_only=True, allow_patterns=patterns))
        except Exception:  # not cached
            continue
        if (path / "tokenizer.json").is_file():
            return path
    if not is_offline():
        try:
            return Path(snapshot_download(TOKENIZERS[0], allow_patterns=patterns))
        except Exception as exc:  # gated repository, network: the message is what matters
            raise CheckpointError(f"ARC-Encoder needs the Llama 3 tokenizer of {TOKENIZERS[0]} ({type(exc).__name__}: {exc}); "
                                  "accept its licence on the hub and set HF_TOKEN, or put tokenizer.json in the checkpoint folder") from exc
    raise CheckpointError(f"ARC-Encoder needs the Llama 3 tokenizer: neither {' nor '.join(TOKENIZERS)} is in the local "
                          "Hugging Face cache and HF_HUB_OFFLINE is set (or put tokenizer.json in the checkpoint folder)")


def convert(directory: Path, target: Path, final: Path, decoder: str | None) -> None:
    """Write the ARC-Encoder checkpoint at ``directory`` into ``target`` in our layout (read at ``final``), for ``decoder``."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from lclm_rag.projector import Projector

    raw = json.loads((directory / "config.json").read_text())
    if not isinstance(raw.get("model_args"), dict):
        raise CheckpointError(f"ARC-Encoder checkpoint {str(directory)!r}: config.json has no model_args")
    ratio, args, emb = check_settings(raw, directory), raw["model_args"], raw["embedder_args"]
    multi = raw["bridge_args"]["bridge_type"] == "multi_module"
    decoder_id, index = decoder_for(directory, decoder, multi)
    where = f"ARC-Encoder checkpoint {str(directory)!r}"
    encoder = load_tensors(directory, "embedder.")
    bridge = load_tensors(directory, "bridge_module.")
    layers = int(args["n_layers"]) - int(emb.get("n_truncated_layers", 0))
    bridge_prefix = f"{index}." if multi else ""
    cont_key = next((k for k in (f"cont_tok.{index}.weight", "cont_tok.weight") if k in encoder), f"cont_tok.{index}.weight")
    require(encoder, ["tok_embeddings.weight", cont_key] + [f"layers.{i}.attention.wq.weight" for i in range(layers)], where)
    require(bridge, [f"{bridge_prefix}layer1.weight", f"{bridge_prefix}layer2.weight"], where)
    if f"layers.{layers}.attention.wq.weight" in encoder:
        raise CheckpointError(f"{where} holds more than the {layers} layers its model_args and n_truncated_layers give")

    heads, dim = int(args["n_heads"]), int(args["dim"])
    config = LlamaConfig(
        vocab_size=int(args["vocab_size"]), hidden_size=dim, intermediate_size=int(args["hidden_dim"]),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=int(args.get("n_kv_heads", heads)),
        head_dim=int(args.get("head_dim", dim // heads)), rms_norm_eps=float(args["norm_eps"]),
        rope_theta=float(args.get("rope_theta") or 1_000_000.0), max_position_embeddings=128_000, tie_word_embeddings=False,
    )  # no rope scaling: ARC's precompute_freqs_cis has none
    config.architectures = ["LlamaModel"]
    weights = to_transformers(encoder, heads, config.num_key_value_heads)
    weights["norm.weight"] = torch.ones(dim, dtype=weights["embed_tokens.weight"].dtype)  # unused: no final norm
    config.save_pretrained(target / "encoder")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(target / "encoder" / "model.safetensors"))
    copy_tokenizer(encoder_tokenizer(directory), target / "encoder")

    layer1, layer2 = bridge[f"{bridge_prefix}layer1.weight"], bridge[f"{bridge_prefix}layer2.weight"]
    save_projector(target, {"fc1.weight": layer1, "fc2.weight": layer2})
    projector = Projector(layer1.shape[1], layer2.shape[0], layer1.shape[0], kind="factored")
    projector.load_state_dict({"fc1.weight": layer1.float(), "fc2.weight": layer2.float(),
                               "latent_shift": torch.zeros(layer1.shape[1]), "latent_scale": torch.ones(layer1.shape[1])})
    with torch.no_grad():  # cont_tok goes through the bridge with the latents: its image is a fixed decoder embedding
        end = projector(encoder[cont_key].float().reshape(1, -1))
    save_file({"boundary": end.contiguous()}, str(target / "decoder.safetensors"))

    LatentConfig(
        encoder=str(final / "encoder"), encoder_layers=None, encoder_attention="bidirectional", pooling="pooled_queries",
        ratio=ratio, encoder_window=WINDOW, encoder_hidden_size=dim, decoder=decoder_id, projector_kind="factored",
        projector_hidden_size=int(layer1.shape[0]), boundary="learned", boundary_sides="end", prompt_template="arc",
        decoder_prompt="bos-text",
        extra={"source_format": "arc-encoder", "source": str(directory), "decoder_index": index, "licence": LICENCE},
    ).save(target)
