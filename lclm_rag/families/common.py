"""What every family's conversion shares: reading its files, and writing our layout once.

A published checkpoint is converted into a directory of our own layout (``config.json``, the
trained parts as safetensors, the base models as folders transformers reads) under
``$LCLM_RAG_HOME/converted/``, keyed by the source's files, so it happens once per checkpoint
and every later load is an ordinary load of our layout. Weights that need no renaming (Squid's
decoder) are linked, not copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from lclm_rag.errors import CheckpointError
from lclm_rag.hub import lclm_home

CONVERTED_DIR = "converted"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json")
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a CheckpointError naming the file."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {str(path.parent)!r} is missing {path.name}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a config: a JSON object is expected, got {type(raw).__name__}")
    return raw


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a transformers-style folder: one file, or the shards its index lists."""
    if (directory / WEIGHTS).is_file():
        return [directory / WEIGHTS]
    if (directory / WEIGHTS_INDEX).is_file():
        shards = sorted(set(read_json(directory / WEIGHTS_INDEX).get("weight_map", {}).values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if shards and not missing:
            return [directory / s for s in shards]
        raise CheckpointError(f"checkpoint {str(directory)!r} is missing the shards {missing or 'its index lists'}")
    raise CheckpointError(f"checkpoint {str(directory)!r} has neither {WEIGHTS} nor {WEIGHTS_INDEX}")


def load_tensors(directory: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefix`` (prefix removed), read shard by shard."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name.startswith(prefix):
                        out[name[len(prefix):]] = f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for truncated files
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    return out


def require(tensors: dict[str, torch.Tensor], names: list[str], where: str) -> None:
    """Refuse a checkpoint that lacks a tensor its family's code reads, naming the first ones."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointError(f"{where} is missing the weights {missing[:4]}{' ...' if len(missing) > 4 else ''}")


def copy_tokenizer(source: Path, target: Path) -> None:
    """Copy a tokenizer's files (whichever of the usual ones exist) into ``target``."""
    found = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if "tokenizer.json" not in found and "vocab.json" not in found and "tokenizer.model" not in found:
        raise CheckpointError(f"{str(source)!r} holds no tokenizer (tokenizer.json, vocab.json or tokenizer.model)")
    target.mkdir(parents=True, exist_ok=True)
    for name in found:
        shutil.copyfile(source / name, target / name)


def link_weights(source: Path, target: Path) -> None:
    """Link a folder's safetensors (and their index) into ``target``: read in place, never copied."""
    target.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in weight_files(source)] + ([WEIGHTS_INDEX] if (source / WEIGHTS_INDEX).is_file() else [])
    for name in names:
        os.symlink((source / name).resolve(), target / name)


def source_key(directory: Path, *choices: str) -> str:
    """A short digest of a checkpoint's files (names, sizes, times) and the loader's choices."""
    h = hashlib.sha256(str(directory.resolve()).encode())
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            stat = path.stat()
            h.update(f"{path.relative_to(directory)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for choice in choices:
        h.update(choice.encode())
    return h.hexdigest()[:16]


def converted_once(family: str, directory: Path, choices: tuple[str, ...], build: Callable[[Path, Path], None]) -> Path:
    """The converted directory for ``directory``; ``build(tmp, final)`` writes it into ``tmp`` the first
    time (its config naming the folders under ``final``, where it is renamed to).

    Written under a temporary name and renamed, so a killed conversion leaves nothing half done
    and two processes converting at once both end with the same directory.
    """
    target = lclm_home() / CONVERTED_DIR / f"{family}-{source_key(directory, *choices)}"
    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp, target)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_projector(target: Path, state: dict[str, torch.Tensor]) -> None:
    """``projector.safetensors`` in our names, with the identity standardisation the family never had."""
    from safetensors.torch import save_file

    width = state["fc1.weight"].shape[1]
    full = {"latent_shift": torch.zeros(width), "latent_scale": torch.ones(width), **state}
    save_file({k: v.float().contiguous() for k, v in full.items()}, str(target / "projector.safetensors"))
