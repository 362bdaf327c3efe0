"""Published checkpoint families read without their remote code: Squid / Dolphin and ARC-Encoder.

Each is recognised by its own ``config.json`` and converted once into a directory of our layout
(`lclm_rag.families.common`), which every part of the library then loads as it loads ours: the
compressor's fingerprint, the store's spec, ingestion, planning and the engines see no
difference. LCLM's layout is read in place (`lclm_rag.checkpoint`).
"""

from __future__ import annotations

import json
from pathlib import Path

from lclm_rag.config import FORMAT_NAME
from lclm_rag.families.arc import convert as convert_arc
from lclm_rag.families.arc import decoder_for, is_arc
from lclm_rag.families.common import converted_once
from lclm_rag.families.squid import convert as convert_squid
from lclm_rag.families.squid import is_squid

FAMILIES = ("squid", "arc-encoder")


def family_of(directory: str | Path) -> str | None:
    """``squid`` or ``arc-encoder`` for a checkpoint of that family, else None (ours, LCLM's, or not a checkpoint)."""
    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent or unreadable: the caller's own loading says what is wrong
    if not isinstance(raw, dict) or raw.get("format") == FORMAT_NAME:
        return None
    if is_squid(raw):
        return "squid"
    if is_arc(raw):
        return "arc-encoder"
    return None


def convert_family(directory: str | Path, decoder: str | None = None) -> Path:
    """Our layout of a family's checkpoint (converted on first use); ``decoder`` picks ARC's decoder."""
    directory = Path(directory)
    family = family_of(directory)
    if family == "squid":
        return converted_once(family, directory, (), lambda tmp, final: convert_squid(directory, tmp, final))
    if family == "arc-encoder":
        raw = json.loads((directory / "config.json").read_text())
        decoder_id, index = decoder_for(directory, decoder, raw["bridge_args"].get("bridge_type") == "multi_module")
        return converted_once(family, directory, (decoder_id, str(index)),
                              lambda tmp, final: convert_arc(directory, tmp, final, decoder))
    raise ValueError(f"{directory} is not a checkpoint of a known family")
