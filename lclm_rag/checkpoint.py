"""Checkpoint directories: ours, and the layout of the published LCLM checkpoints (Squid's and
ARC-Encoder's are converted into ours once, `lclm_rag.families`).

Ours::

    config.json               every shape setting and the base model references
    projector.safetensors     norm / fc1 / fc2
    decoder.safetensors       learned boundary embeddings (boundary="learned")
    compressor.safetensors    memory embeddings (pooling="memory")
    encoder_lora/ decoder_lora/   peft adapters, when trained

LCLM (LeonLixyz/LCLM release)::

    model_config.json         compression_ratio, pooling, encoder_mask_type, encoder_window_size, ...
    encoder/ decoder/         full Hugging Face model folders (the decoder's tokenizer holds
                              <|memory_start|> and <|memory_end|>)
    adapter/adapter.safetensors   RMSNorm -> Linear -> GELU -> Linear (norm / fc1 / fc2)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lclm_rag.config import CONFIG_NAME, LatentConfig
from lclm_rag.errors import CheckpointError, ConfigError
from lclm_rag.families import convert_family, family_of

LCLM_CONFIG = "model_config.json"
LCLM_ADAPTER = "adapter/adapter.safetensors"
PACKAGED_DIR = Path(__file__).parent / "checkpoints"
DEFAULT_CHECKPOINT = "smollm2-135m-r4"  # the trained compressor shipped as package data


def require_file(directory: str | Path, name: str) -> Path:
    path = Path(directory) / name
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(directory)!r} is missing {name}")
    return path


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


def save_adapter(peft_model, directory: str | Path) -> None:
    """Save a peft adapter; embedding rows only when the adapter targets an embedding layer.

    peft's default ("auto") asks the hub whether the base model's vocabulary changed, a network
    call on every checkpoint save that fails (with warnings) offline and learns nothing here.
    """
    peft_model.save_pretrained(str(directory), save_embedding_layers=targets_embeddings(peft_model))


def targets_embeddings(peft_model) -> bool:
    """Does the active adapter target an embedding layer (so its state holds embedding rows)?"""
    from peft.utils.other import EMBEDDING_LAYER_NAMES

    targets = peft_model.peft_config[peft_model.active_adapter].target_modules or ()  # a set, or one regex string
    return any(name in targets for name in EMBEDDING_LAYER_NAMES)


def add_lora(model, lora: dict):
    """``model`` wrapped with a fresh peft LoRA (``LoraConfig(**lora)``).

    peft reads transformers' deprecated ``is_gradient_checkpointing``; its FutureWarning says
    nothing about this project, so exactly that one is silenced here.
    """
    import warnings

    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, LoraConfig(**lora))


def load_adapter(peft_model, directory: str | Path, subdir: str) -> None:
    """Load the peft adapter weights saved under ``directory/subdir`` into ``peft_model``."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, load_safetensors(require_file(directory, f"{subdir}/adapter_model.safetensors")))


def packaged_checkpoints() -> dict[str, Path]:
    """Trained compressors shipped with the package, by name (e.g. ``smollm2-135m-r4``)."""
    if not PACKAGED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(PACKAGED_DIR.iterdir()) if (p / CONFIG_NAME).exists()}


def resolve_checkpoint(name_or_path: str | Path, decoder: str | None = None) -> Path:
    """A checkpoint directory from a path, the name of a packaged checkpoint, or a Hugging Face hub id.

    A Squid or ARC-Encoder checkpoint resolves to its conversion into our layout (made once,
    `lclm_rag.families`); ``decoder`` picks the decoder an ARC-Encoder checkpoint is read with.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return convert_family(path, decoder) if family_of(path) else path
    packaged = packaged_checkpoints()
    if str(name_or_path) in packaged:
        return packaged[str(name_or_path)]
    name = str(name_or_path)
    if _looks_like_hub_id(name) and not (path.parent != Path(".") and path.parent.is_dir()):  # runs/x is a path
        path = _download_checkpoint(name)
        return convert_family(path, decoder) if family_of(path) else path
    raise CheckpointError(
        f"checkpoint {name!r} is neither a directory, a packaged checkpoint (packaged: {sorted(packaged) or 'none'}) "
        "nor a hub id (owner/name)"
    )


def _looks_like_hub_id(name: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not name.startswith((".", "/", "~"))


def _download_checkpoint(repo_id: str) -> Path:
    """A hub checkpoint from the local cache, or downloaded (unless HF_HUB_OFFLINE is set)."""
    from huggingface_hub import snapshot_download

    from lclm_rag.hub import is_offline

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached: download below, or explain
        pass
    if is_offline():
        raise CheckpointError(f"checkpoint {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                              f"download it on a connected machine (huggingface-cli download {repo_id}) or pass a directory")
    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # network and hub errors come in many types; the message is what matters
        raise CheckpointError(f"checkpoint {repo_id!r} could not be downloaded from the Hugging Face hub "
                              f"({type(exc).__name__}: {exc}); check the id, the network and HF_TOKEN") from exc


def is_lclm_layout(directory: str | Path) -> bool:
    return (Path(directory) / LCLM_CONFIG).exists() and not (Path(directory) / CONFIG_NAME).exists()


def lclm_config(directory: str | Path) -> LatentConfig:
    """Translate an LCLM ``model_config.json`` into our config, refusing what we cannot reproduce."""
    directory = Path(directory)
    try:
        raw = json.loads(require_file(directory, LCLM_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{directory / LCLM_CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{directory / LCLM_CONFIG} is not a config: a JSON object is expected, got {type(raw).__name__}")
    for sub in ("encoder", "decoder"):
        require_file(directory, f"{sub}/config.json")
    require_file(directory, LCLM_ADAPTER)
    ratio = raw.get("compression_ratio", raw.get("chunk_size"))
    if ratio is None:
        raise CheckpointError(f"{directory / LCLM_CONFIG} has no compression_ratio")
    checks = {
        "pooling": (raw.get("pooling", "mean"), ("mean",)),
        "encoder_mask_type": (raw.get("encoder_mask_type", "causal"), ("causal",)),
        "adapter_type": (raw.get("adapter_type", "mlp"), ("mlp",)),
        "boundary_overlap": (raw.get("boundary_overlap", 0), (0,)),
    }
    for key, (value, supported) in checks.items():
        if value not in supported:
            raise ConfigError(f"LCLM checkpoint {str(directory)!r}: {key}={value!r} is not supported (supported: {supported})")
    decoder_cfg = json.loads((directory / "decoder" / "config.json").read_text())
    decoder_hidden = decoder_cfg.get("hidden_size") or decoder_cfg.get("text_config", {}).get("hidden_size")
    return LatentConfig(
        encoder=str(directory / "encoder"),
        encoder_layers=None,
        pooling="mean",
        ratio=int(ratio),
        encoder_window=int(raw.get("encoder_window_size", 1024)),
        decoder=str(directory / "decoder"),
        boundary="tokens",
        boundary_tokens=("<|memory_start|>", "<|memory_end|>"),
        projector_hidden_size=decoder_hidden,
        projector_eps=1e-6,
        extra={"source_format": "lclm", "lclm_model_config": raw},
    )


def load_config(directory: str | Path) -> LatentConfig:
    """Config of a checkpoint in either layout."""
    directory = resolve_checkpoint(directory)
    if is_lclm_layout(directory):
        return lclm_config(directory)
    return LatentConfig.load(directory)
