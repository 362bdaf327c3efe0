"""The trainable parts of a latent-context model, and which of them a stage trains."""

from __future__ import annotations

import dataclasses

from torch import nn

from lclm_rag.errors import ConfigError
from lclm_rag.model import LatentContextModel
from lclm_rag.training.recipe import PARTS, StageConfig


def set_ratio(model: LatentContextModel, ratio: int) -> None:
    """Compress 1 per ``ratio`` tokens from now on (a ratio curriculum).

    Mean pooling has no ratio-shaped weights; concat pooling pools by mean at any other ratio
    than its own, so a 1:1 -> 1:2 -> 1:4 curriculum reaches its trained layer at the last step.
    """
    if ratio == model.config.ratio:
        return
    if model.config.pooling == "memory":
        raise ConfigError("a stage ratio needs mean or concat pooling: memory pooling has ratio-sized parameters")
    config = dataclasses.replace(model.config, ratio=ratio)
    model.config = model.compressor.config = model.decoder.config = config


def part_parameters(model: LatentContextModel, part: str) -> list[nn.Parameter]:
    """The parameters of one trainable part (see ``PARTS``)."""
    dec, comp = model.decoder, model.compressor
    if part == "projector":
        return list(dec.projector.parameters())
    if part == "boundary":
        return [dec.boundary] if dec.boundary is not None else []
    if part == "memory":
        return [comp.memory_embeddings] if comp.memory_embeddings is not None else []
    if part == "pooling":
        return list(comp.concat_pool.parameters()) if comp.concat_pool is not None else []
    if part == "encoder":
        return list(comp.encoder.parameters())
    if part in ("decoder_lora", "encoder_lora"):
        if not getattr(model.config, part):
            raise ConfigError(f"stage trains {part} but the model config has no {part} settings")
        module = dec.model if part == "decoder_lora" else comp.encoder
        return [p for name, p in module.named_parameters() if "lora_" in name]
    raise ConfigError(f"unknown part {part!r} (known: {PARTS})")


def set_trainable(model: LatentContextModel, parts: list[str]) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the named parts; returns the trainable parameters."""
    model.requires_grad_(False)
    for part in parts:
        for p in part_parameters(model, part):
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model: LatentContextModel, stage: StageConfig) -> list[dict]:
    """One optimizer group per trained part, at its own peak lr (``stage.part_lr``) or ``stage.lr``."""
    groups, seen = [], set()
    for part in stage.train:
        params = [p for p in part_parameters(model, part) if id(p) not in seen]  # "encoder" contains "encoder_lora"
        seen.update(id(p) for p in params)
        if params:
            groups.append({"params": params, "lr": stage.part_lr.get(part, stage.lr), "name": part})
    return groups
