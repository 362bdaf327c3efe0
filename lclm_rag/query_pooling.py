"""Pooled-query attention: the encoder's last layer reads one query per group of tokens (ARC-Encoder).

ARC-Encoder (arXiv 2510.20535) pools inside its encoder rather than after it: the input states of
the last transformer layer are averaged per group of ``ratio`` tokens, and those means are that
layer's queries, while its keys and values are every token's state. The queries take rotary
positions 0..n-1, the keys 0..T-1; attention is bidirectional within a window; the layer's
residual stream starts from the pooled means, and no final norm follows. Groups are balanced: a
window of T tokens splits into ceil(T / ratio) groups whose sizes differ by at most one (the larger
first), which is how ARC's ``split_integer`` cuts a sequence for a negative compression rate.

The layer is the encoder LM's own (an ``...DecoderLayer`` of transformers: ``input_layernorm``,
``self_attn`` with ``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``post_attention_layernorm``,
``mlp``), so any checkpoint in transformers' layout supplies its weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def balanced_groups(length: int, ratio: int) -> list[int]:
    """Sizes of the ceil(length / ratio) groups a window of ``length`` tokens is pooled in, larger first."""
    count = max(1, math.ceil(length / ratio))
    size, extra = divmod(length, count)
    return [size + 1] * extra + [size] * (count - extra)


def pooling_matrix(lengths: list[int], ratio: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(batch, groups, width) weights that average each window's groups (padding weighs nothing)."""
    groups = [balanced_groups(n, ratio) for n in lengths]
    out = torch.zeros(len(lengths), max(len(g) for g in groups), width, dtype=dtype, device=device)
    for row, sizes in enumerate(groups):
        start = 0
        for g, size in enumerate(sizes):
            out[row, g, start : start + size] = 1.0 / size
            start += size
    return out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in transformers' half-split convention ((batch, heads, positions, head_dim))."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class PooledQueryLayer(nn.Module):
    """The encoder's last layer, run with pooled queries against all of a window's states."""

    def __init__(self, layer: nn.Module, rotary: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.rotary = rotary  # the encoder's rotary embedding (no weights; shared with the encoder)

    def forward(self, states: torch.Tensor, mask: torch.Tensor, lengths: list[int], ratio: int) -> tuple[torch.Tensor, list[int]]:
        """``states`` (batch, T, hidden): the last layer's inputs; ``mask`` (batch, T): real tokens.

        Returns (batch, groups, hidden) latents and the number of groups of each window.
        """
        layer, attn = self.layer, self.layer.self_attn
        pool = pooling_matrix(lengths, ratio, states.shape[1], states.dtype, states.device)
        queries = pool @ states  # the residual stream of the pooled positions
        counts = [math.ceil(n / ratio) for n in lengths]
        batch, groups, width = queries.shape[0], queries.shape[1], states.shape[1]
        q_in, kv_in = layer.input_layernorm(queries), layer.input_layernorm(states)
        head = attn.head_dim
        q = attn.q_proj(q_in).view(batch, groups, -1, head).transpose(1, 2)
        k = attn.k_proj(kv_in).view(batch, width, -1, head).transpose(1, 2)
        v = attn.v_proj(kv_in).view(batch, width, -1, head).transpose(1, 2)
        q_pos = torch.arange(groups, device=states.device)[None].expand(batch, -1)
        k_pos = torch.arange(width, device=states.device)[None].expand(batch, -1)
        q = _rotate(q, *self.rotary(q, q_pos))
        k = _rotate(k, *self.rotary(k, k_pos))
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        keys = mask[:, None, None, :].to(torch.bool).expand(batch, 1, groups, width)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keys, scale=attn.scaling)
        h = queries + attn.o_proj(out.transpose(1, 2).reshape(batch, groups, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, counts
