"""How latents are stored: uint8 with a scale and offset per vector (the default for new
collections) or float16.

uint8 halves the bytes of the latent values (Qdrant's ``uint8`` vector datatype): each latent vector is
mapped linearly from its own [min, max] onto 0..255, and the two floats that undo it travel in
the point's payload (``latent_scale``, ``latent_offset``), one pair per vector. The error of a
value is at most half a step, (max - min) / 510.
"""

from __future__ import annotations

import dataclasses

import torch

from lclm_rag.store.base import LATENT_DTYPES, StoredPassage

# what a new collection stores: 56% of float16's bytes per passage at 1:4, and on 500 SQuAD dev gold questions
# the same answers within noise (docs/benchmarks.md); an existing collection keeps its own type
DEFAULT_LATENT_DTYPE = "uint8"
SCALE, OFFSET = "latent_scale", "latent_offset"


def quantize(latents: torch.Tensor) -> tuple[torch.Tensor, list[float], list[float]]:
    """(values 0..255 as float32, scale per row, offset per row)."""
    x = latents.detach().to("cpu", torch.float32)
    lo, hi = x.min(dim=1).values, x.max(dim=1).values
    scale = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
    q = torch.round((x - lo[:, None]) / scale[:, None]).clamp_(0, 255)
    return q, scale.tolist(), lo.tolist()


def dequantize(q: torch.Tensor, scale: list[float], offset: list[float]) -> torch.Tensor:
    return q * torch.tensor(scale, dtype=torch.float32)[:, None] + torch.tensor(offset, dtype=torch.float32)[:, None]


def encode(passage: StoredPassage, latent_dtype: str) -> StoredPassage:
    """The passage as the collection stores it (the caller's object is left as it is)."""
    if latent_dtype == "float16":
        return passage
    q, scale, offset = quantize(passage.latents)
    return dataclasses.replace(passage, latents=q, payload={**passage.payload, SCALE: scale, OFFSET: offset})


def decode(passage: StoredPassage, latent_dtype: str) -> StoredPassage:
    """The passage as a reader uses it: float32 latents, no quantisation fields in the payload."""
    if latent_dtype == "float16":
        return passage
    scale, offset = passage.payload.pop(SCALE, None), passage.payload.pop(OFFSET, None)
    if passage.latents is not None:
        passage.latents = dequantize(passage.latents, scale, offset)
    return passage


def as_stored(latents: torch.Tensor, latent_dtype: str) -> torch.Tensor:
    """What a reader gets back after storing ``latents`` as ``latent_dtype`` (float32): to measure
    the cost of a storage type without building a collection."""
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent_dtype must be one of {LATENT_DTYPES}, got {latent_dtype!r}")
    if latent_dtype == "float16":
        return latents.detach().to("cpu", torch.float16).float()
    return dequantize(*quantize(latents))
