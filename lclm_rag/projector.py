"""Projector: encoder latent width -> decoder input-embedding width.

RMSNorm -> Linear -> GELU -> Linear, as LCLM's adapter (parameter names ``norm``, ``fc1``,
``fc2`` match its ``adapter.safetensors``, so published weights load as they are).
"""

from __future__ import annotations

import torch
from torch import nn

from lclm_rag.errors import ConfigError


class Projector(nn.Module):
    def __init__(self, in_features: int, out_features: int, hidden_features: int | None = None, eps: float = 1e-6) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"projector {name} must be a positive integer, got {value!r}")
        hidden_features = hidden_features or out_features
        self.in_features, self.out_features = in_features, out_features
        self.norm = nn.RMSNorm(in_features, eps=eps)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.shape[-1] != self.in_features:
            raise ConfigError(
                f"latents have width {latents.shape[-1]} but the projector expects {self.in_features}: "
                "they come from a different encoder than this model's"
            )
        return self.fc2(self.act(self.fc1(self.norm(latents))))
