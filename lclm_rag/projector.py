"""Projector: encoder latent width -> decoder input-embedding width.

Three kinds, each a published one: ``mlp`` is RMSNorm -> Linear -> GELU -> Linear, as LCLM's
adapter (parameter names ``norm``, ``fc1``, ``fc2`` match its ``adapter.safetensors``, so
published weights load as they are) and ours; ``linear`` is one Linear with a bias (Squid's
``context_projection``); ``factored`` is two bias-free Linears with nothing between them
(ARC-Encoder's ``mlp`` bridge: ``layer1``, ``layer2``).

Before the RMSNorm, latents are standardised per channel with statistics measured once on
training passages (:meth:`Projector.calibrate`). Hidden states of LLaMA-style LMs carry a few
huge, nearly constant channels ("massive activations"); left in, they dominate the RMSNorm and
every latent looks alike (mean pairwise cosine 0.72 for SmolLM2's 4th layer, 0.00 once
centred), and the informative channels reach the decoder scaled down. Standardising fixes that
geometry and speeds up learning to read the latents. The
statistics are buffers that default to the identity, so an adapter trained without them (LCLM's)
loads and behaves unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from lclm_rag.errors import ConfigError

KINDS = ("mlp", "linear", "factored")


class Projector(nn.Module):
    def __init__(self, in_features: int, out_features: int, hidden_features: int | None = None, eps: float = 1e-6,
                 kind: str = "mlp") -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"projector {name} must be a positive integer, got {value!r}")
        if kind not in KINDS:
            raise ConfigError(f"projector kind must be one of {KINDS}, got {kind!r}")
        hidden_features = hidden_features or out_features
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.norm = nn.RMSNorm(in_features, eps=eps) if kind == "mlp" else None
        if kind == "linear":
            self.fc1, self.fc2 = nn.Linear(in_features, out_features), None
        else:
            bias = kind == "mlp"
            self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
            self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.act = nn.GELU() if kind == "mlp" else None
        self._zero_biases()
        self.register_buffer("latent_shift", torch.zeros(in_features))  # per-channel mean
        self.register_buffer("latent_scale", torch.ones(in_features))  # per-channel std

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A fresh, uncalibrated projector (e.g. for a new encoder under an already trained decoder)."""
        if self.norm is not None:
            self.norm.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()
        self._zero_biases()
        self.latent_shift.zero_()
        self.latent_scale.fill_(1.0)

    @property
    def layers(self) -> list[nn.Linear]:
        """The Linear layers, first to last (the last one writes the decoder's embedding space)."""
        return [layer for layer in (self.fc1, self.fc2) if layer is not None]

    @torch.no_grad()
    def _zero_biases(self) -> None:
        for layer in self.layers:
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    @property
    def calibrated(self) -> bool:
        return bool(self.latent_shift.any() or (self.latent_scale != 1).any())

    @torch.no_grad()
    def calibrate(self, latents: torch.Tensor, min_scale: float = 1e-3) -> None:
        """Set the per-channel standardisation from a sample of latents (N x in_features)."""
        if latents.dim() != 2 or latents.shape[1] != self.in_features or latents.shape[0] < 2:
            raise ConfigError(f"calibration needs at least 2 latents of width {self.in_features}, got {tuple(latents.shape)}")
        latents = latents.to(self.latent_shift)
        self.latent_shift.copy_(latents.mean(0))
        self.latent_scale.copy_(latents.std(0).clamp(min=min_scale))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.shape[-1] != self.in_features:
            raise ConfigError(
                f"latents have width {latents.shape[-1]} but the projector expects {self.in_features}: "
                "they come from a different encoder than this model's"
            )
        x = (latents - self.latent_shift) / self.latent_scale
        if self.kind == "mlp":
            return self.fc2(self.act(self.fc1(self.norm(x))))
        return self.fc1(x) if self.fc2 is None else self.fc2(self.fc1(x))
