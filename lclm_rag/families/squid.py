"""Squid / Dolphin (arXiv 2408.15518, ``NexaAIDev/Squid``): its checkpoint as our parts.

Facts read from the published code (``modeling_dolphin.py`` and ``configuration_dolphin.py`` of
the ``nexaai-dolphin`` 0.0.1 package, the same files as the hub repository's remote code):

- one transformers folder, ``config.json`` with ``model_type`` ``dolphin`` (the decoder's Qwen2
  settings at the top level, the encoder's under ``encoder_config``), safetensors and the
  tokenizer, which holds the ``[memory_0]`` ... ``[memory_31]`` tokens;
- weights: the decoder as a Qwen2 causal LM (``model.embed_tokens``, ``model.layers.*``,
  ``model.norm``, ``lm_head``), the encoder under ``model.context_encoder.encoder.model.*``
  (a whole Qwen2 model), the projector ``model.context_encoder.projector.context_projection``
  (one Linear with a bias, 896 -> 3584);
- the encoder reads the context followed by the 32 memory tokens, causally, and the final
  (normed) hidden states of those 32 positions are the memory: 32 latents per context whatever
  its length;
- the decoder's prompt (``inference_instruct``) is ``" "``, 32 placeholders, the question, with
  no chat template; the code writes the 32 projected states from the position *before* the
  placeholders (the space) on, so the last placeholder keeps the embedding of token id 0, which
  it substitutes for the placeholder: the decoder reads memory x 32, token 0, the question.

In our parts: memory pooling with ``memory_slots=32`` whose memory embeddings are the encoder's
rows for the memory tokens, a ``linear`` projector, the end boundary the embedding of token 0,
``squid`` prompt template, plain-text prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

from lclm_rag.config import LatentConfig
from lclm_rag.errors import CheckpointError
from lclm_rag.families.common import copy_tokenizer, link_weights, load_tensors, require, save_projector

MODEL_TYPES = ("dolphin", "squid")
MEMORY_SIZE = 32  # MEMORY_SIZE in modeling_dolphin.py
ENCODER_PREFIX = "model.context_encoder.encoder.model."
PROJECTOR_PREFIX = "model.context_encoder.projector.context_projection."
WINDOW = 2048  # ours: Squid encodes a whole context at once; longer passages are cut into windows of this size
LICENCE = "CC-BY-NC-4.0 (the model card), and Qwen2's terms for its base models"


def is_squid(raw: dict) -> bool:
    architectures = raw.get("architectures") or []
    return raw.get("model_type") in MODEL_TYPES or any(str(a).startswith(("Dolphin", "Squid")) for a in architectures)


def memory_token_ids(tokenizer, directory: Path) -> list[int]:
    """The ids of ``[memory_0]`` ... ``[memory_31]``, each one token of the checkpoint's tokenizer."""
    ids = []
    for i in range(MEMORY_SIZE):
        token = f"[memory_{i}]"
        found = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(found) != 1:
            raise CheckpointError(f"Squid checkpoint {str(directory)!r}: its tokenizer has no {token} token")
        ids.append(found[0])
    return ids


def convert(directory: Path, target: Path, final: Path) -> None:
    """Write the Squid checkpoint at ``directory`` into ``target`` in our layout, to be read at ``final``."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config

    raw = json.loads((directory / "config.json").read_text())
    if not isinstance(raw.get("encoder_config"), dict):
        raise CheckpointError(f"Squid checkpoint {str(directory)!r}: config.json has no encoder_config")
    copy_tokenizer(directory, target / "encoder")
    copy_tokenizer(directory, target / "decoder")
    tokenizer = AutoTokenizer.from_pretrained(target / "encoder")
    memory_ids = memory_token_ids(tokenizer, directory)

    encoder_config = Qwen2Config.from_dict({k: v for k, v in raw["encoder_config"].items() if k != "attn_implementation"})
    encoder_config.architectures = ["Qwen2Model"]
    encoder = load_tensors(directory, ENCODER_PREFIX)
    require(encoder, ["embed_tokens.weight", "norm.weight"], f"Squid checkpoint {str(directory)!r} (its encoder)")
    embed = encoder["embed_tokens.weight"]
    if max(memory_ids) >= embed.shape[0]:
        raise CheckpointError(f"Squid checkpoint {str(directory)!r}: memory token id {max(memory_ids)} is beyond the "
                              f"encoder's {embed.shape[0]} embedding rows")
    encoder_config.save_pretrained(target / "encoder")
    save_file({k: v.contiguous() for k, v in encoder.items()}, str(target / "encoder" / "model.safetensors"))

    projector = load_tensors(directory, PROJECTOR_PREFIX)
    require(projector, ["weight", "bias"], f"Squid checkpoint {str(directory)!r} (its projector {PROJECTOR_PREFIX}*)")
    save_projector(target, {"fc1.weight": projector["weight"], "fc1.bias": projector["bias"]})
    save_file({"memory_embeddings": embed[memory_ids].float().contiguous()}, str(target / "compressor.safetensors"))

    settings = {k: v for k, v in raw.items() if k not in ("encoder_config", "auto_map", "architectures", "model_type")}
    decoder_config = Qwen2Config.from_dict({**settings, "architectures": ["Qwen2ForCausalLM"]})
    decoder_config.save_pretrained(target / "decoder")
    link_weights(directory, target / "decoder")  # the decoder's names are Qwen2's own: read in place
    if (directory / "generation_config.json").is_file():
        (target / "decoder" / "generation_config.json").write_text((directory / "generation_config.json").read_text())

    placeholder = tokenizer.convert_ids_to_tokens(0)  # the embedding the last placeholder keeps
    LatentConfig(
        encoder=str(final / "encoder"), encoder_layers=None, pooling="memory", memory_slots=MEMORY_SIZE, ratio=1,
        encoder_window=WINDOW, encoder_hidden_size=int(embed.shape[1]), decoder=str(final / "decoder"),
        projector_kind="linear", boundary="tokens", boundary_tokens=(placeholder, placeholder), boundary_sides="end",
        prompt_template="squid", decoder_prompt="text",
        extra={"source_format": "squid", "source": str(directory), "licence": LICENCE},
    ).save(target)
