"""The encoder side: text -> a few latent vectors per passage (1 per `ratio` tokens).

Four pooling modes from the literature:
- ``mean`` (LCLM): the encoder's last hidden states are split into groups of ``ratio`` tokens
  and each group is averaged (a short last group averages only its real tokens).
- ``memory`` (Squid): ``ceil(T / ratio)`` learned memory embeddings (or a fixed
  ``memory_slots``, Squid's 32) are appended after the passage and their hidden states are the latents.
- ``pooled_queries`` (ARC-Encoder): the last encoder layer's queries are the means of balanced
  groups of ``ratio`` states, attending to every state (`lclm_rag.query_pooling`).
- ``concat`` (LCLM's order-aware ablation): a group's ``ratio`` states are joined into one
  ``ratio * hidden`` vector and a trained linear layer maps it back to ``hidden``, so the order
  of the tokens inside a group survives. The layer starts as mean pooling.

Attention inside a window is the encoder LM's own causal mask, or ``bidirectional`` (every
token sees the whole window: a later token shapes an earlier latent). Passages longer than
``encoder_window`` are cut into windows, each compressed on its own, and the latents
concatenated: nothing is truncated. Batches are right-padded and padding is masked out as a
key, so a passage's latents do not depend on what it is batched with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lclm_rag.config import LatentConfig
from lclm_rag.errors import ConfigError, InputError
from lclm_rag.hub import keep_reference, resolve_model
from lclm_rag.query_pooling import PooledQueryLayer

logger = logging.getLogger(__name__)

COMPRESSOR_WEIGHTS = "compressor.safetensors"
ENCODER_LORA_DIR = "encoder_lora"


def _transformer_layers(model: nn.Module) -> nn.ModuleList:
    for attr in ("layers", "h", "block"):
        layers = getattr(model, attr, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ConfigError(f"cannot find the transformer layers of {type(model).__name__} to truncate the encoder")


def load_encoder(name_or_path: str, num_layers: int | None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the base (headless) transformer of a causal LM, keeping only its first ``num_layers``."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    path = resolve_model(name_or_path)
    config = AutoConfig.from_pretrained(path)
    total = config.num_hidden_layers
    if num_layers is not None:
        if num_layers > total:
            raise ConfigError(f"encoder_layers={num_layers} but {name_or_path!r} has only {total} layers")
        config.num_hidden_layers = num_layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:num_layers]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the dropped layers' weights are "unused": expected, not news
    try:
        model = AutoModel.from_pretrained(path, config=config, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    if len(_transformer_layers(model)) != (num_layers or total):
        raise ConfigError(f"could not truncate {name_or_path!r} to {num_layers} layers")
    keep_reference(model, name_or_path)
    model.eval()
    return model


class ConcatPool(nn.Module):
    """Order-aware pooling: ``[h_1; ...; h_r] -> W [h_1; ...; h_r]`` with ``W`` of shape (hidden, r * hidden).

    ``W`` starts as ``[I/r, ..., I/r]`` (mean pooling), so a fresh layer changes nothing until
    trained. A short last group is filled with the mean of its real states, which keeps the
    equality with mean pooling there too.
    """

    def __init__(self, hidden: int, ratio: int) -> None:
        super().__init__()
        self.ratio = ratio
        self.proj = nn.Linear(ratio * hidden, hidden, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(hidden).repeat(1, ratio) / ratio)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """``states`` (n, hidden) -> (ceil(n / ratio), hidden)."""
        r = self.ratio
        count, rest = divmod(states.shape[0], r)
        if rest:
            tail = states[count * r :]
            states = torch.cat([states, tail.mean(0, keepdim=True).expand(r - rest, -1)])
            count += 1
        return self.proj(states.reshape(count, r * states.shape[-1]).to(self.proj.weight.dtype))


def bidirectional_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (batch, 1, T, T) additive mask: every query sees every real key of its row, no padding."""
    blocked = torch.finfo(dtype).min
    keys = mask[:, None, None, :].to(torch.bool)
    return torch.zeros((mask.shape[0], 1, mask.shape[1], mask.shape[1]), dtype=dtype, device=mask.device).masked_fill(~keys, blocked)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors, cast to float32 so the dtype a model is run in does not matter."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class LatentCompressor(nn.Module):
    """Encoder LM + pooling. ``compress(texts)`` returns one ``(n_i, hidden)`` tensor per text."""

    def __init__(self, config: LatentConfig, encoder: nn.Module | None = None, tokenizer=None) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.config = config
        self.encoder = encoder if encoder is not None else load_encoder(config.encoder, config.encoder_layers)
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(resolve_model(config.encoder))
        hidden = self.encoder.config.hidden_size
        if config.encoder_hidden_size and config.encoder_hidden_size != hidden:
            raise ConfigError(
                f"config says encoder_hidden_size={config.encoder_hidden_size} but {config.encoder!r} has {hidden}"
            )
        self.config = config = dataclasses.replace(config, encoder_hidden_size=hidden)  # the caller's config is left as given
        if config.pooling == "memory":
            embed = self.encoder.get_input_embeddings().weight.detach()
            init = embed.mean(0, keepdim=True) + embed.std() * torch.randn(config.max_memory_tokens, hidden) * 0.1
            self.memory_embeddings = nn.Parameter(init.to(embed.dtype))
        else:
            self.memory_embeddings = None
        self.concat_pool = ConcatPool(hidden, config.ratio) if config.pooling == "concat" else None
        self.query_pool = self._split_last_layer() if config.pooling == "pooled_queries" else None
        if config.encoder_lora:
            from lclm_rag.checkpoint import add_lora

            self.encoder = add_lora(self.encoder, config.encoder_lora)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.encoder_calls = 0  # forward passes through the encoder (query paths must leave it at 0)
        self._fingerprint: str | None = None

    def _split_last_layer(self) -> PooledQueryLayer:
        """Take the encoder's last layer out of its stack (it reads pooled queries), and its final
        norm, which ARC-Encoder's latents never pass through."""
        layers = _transformer_layers(self.encoder)
        if len(layers) < 2:
            raise ConfigError("pooled_queries pooling needs an encoder of at least 2 layers")
        last = layers[-1]
        del layers[-1]
        self.encoder.config.num_hidden_layers = len(layers)
        if isinstance(getattr(self.encoder.config, "layer_types", None), list):
            self.encoder.config.layer_types = self.encoder.config.layer_types[: len(layers)]
        self.encoder.norm = nn.Identity()
        return PooledQueryLayer(last, self.encoder.rotary_emb)

    # ------------------------------------------------------------------ tokens
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Encoder token ids of each passage (no special tokens). Rejects empty or non-string input."""
        if isinstance(texts, str):
            raise InputError("compress() takes a list of passages, not a single string: wrap it in [...]")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"passage {i} is {type(text).__name__}, not str")
            if not text.strip():
                raise InputError(f"passage {i} is empty: there is nothing to compress")
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def num_latents(self, num_tokens: int) -> int:
        """Latents for a passage of ``num_tokens`` tokens: ceil(T / ratio), window by window."""
        w, r, slots = self.config.encoder_window, self.config.ratio, self.config.memory_slots
        full, rest = divmod(num_tokens, w)
        if slots:
            return (full + (rest > 0)) * slots
        return full * (w // r) + math.ceil(rest / r)

    # ------------------------------------------------------------------ encoding
    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def _encode_windows(self, windows: list[list[int]]) -> list[torch.Tensor]:
        """One batched forward over windows (each <= encoder_window tokens) -> pooled latents."""
        r = self.config.ratio
        lens = [len(w) for w in windows]
        counts = [self.config.memory_slots or math.ceil(n / r) for n in lens]
        memory = self.memory_embeddings is not None
        totals = [n + c for n, c in zip(lens, counts)] if memory else lens
        width = max(totals)
        ids = torch.full((len(windows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(windows), width), dtype=torch.long)
        for i, w in enumerate(windows):
            ids[i, : len(w)] = torch.tensor(w, dtype=torch.long)
            mask[i, : totals[i]] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = self.encoder.get_input_embeddings()(ids)
        if memory:  # place memory slots right after each passage's tokens
            rows = []
            for i, (n, c) in enumerate(zip(lens, counts)):
                rows.append(torch.cat([embeds[i, :n], self.memory_embeddings[:c].to(embeds.dtype), embeds[i, n + c :]]))
            embeds = torch.stack(rows)
        self.encoder_calls += 1
        attention = bidirectional_mask(mask, embeds.dtype) if self.config.encoder_attention == "bidirectional" else mask
        hidden = self.encoder(inputs_embeds=embeds, attention_mask=attention).last_hidden_state
        if self.query_pool is not None:
            pooled, counts = self.query_pool(hidden, mask, lens, r)
            return [pooled[i, :c] for i, c in enumerate(counts)]
        # a ratio curriculum (training) may run a concat model below its ratio: it pools by mean there
        concat = self.concat_pool if self.concat_pool is not None and self.concat_pool.ratio == r else None
        out = []
        for i, (n, c) in enumerate(zip(lens, counts)):
            if memory:
                out.append(hidden[i, n : n + c])
                continue
            if concat is not None:
                out.append(concat(hidden[i, :n]).to(hidden.dtype))
                continue
            h = hidden[i, :n]
            pad = c * r - n
            if pad:
                h = torch.cat([h, h.new_zeros(pad, h.shape[-1])])
            sums = h.view(c, r, -1).sum(1)
            sizes = torch.full((c, 1), float(r), dtype=h.dtype, device=h.device)
            sizes[-1, 0] = r - pad
            out.append(sums / sizes)
        return out

    def encode_ids(self, token_ids: Sequence[Sequence[int]], batch_size: int = 16) -> list[torch.Tensor]:
        """Latents for pre-tokenized passages; differentiable (training calls this)."""
        w = self.config.encoder_window
        windows, owner = [], []
        for p, ids in enumerate(token_ids):
            if len(ids) == 0:
                raise InputError(f"passage {p} has no tokens: there is nothing to compress")
            for start in range(0, len(ids), w):
                windows.append(list(ids[start : start + w]))
                owner.append(p)
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]))  # less padding per batch
        pooled: list[torch.Tensor | None] = [None] * len(windows)
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            for i, lat in zip(idx, self._encode_windows([windows[i] for i in idx])):
                pooled[i] = lat
        per_passage: list[list[torch.Tensor]] = [[] for _ in token_ids]
        for i, p in enumerate(owner):
            per_passage[p].append(pooled[i])
        return [torch.cat(parts) for parts in per_passage]

    @torch.no_grad()
    def compress(self, texts: Sequence[str], batch_size: int = 16) -> list[torch.Tensor]:
        """Latents (encoder side, before the projector) of each passage, on CPU."""
        was_training = self.training
        self.eval()
        try:
            return [t.cpu() for t in self.encode_ids(self.tokenize(texts), batch_size=batch_size)]
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ identity
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The compressor's own trained tensors (memory embeddings, concat pooling); LoRA is saved by peft."""
        state = {} if self.memory_embeddings is None else {"memory_embeddings": self.memory_embeddings.detach()}
        if self.concat_pool is not None:
            state["concat_pool"] = self.concat_pool.proj.weight.detach()
        return state

    def fingerprint(self) -> str:
        """Hash of everything that determines the stored latents.

        Encoder weights (as used, after truncation and any LoRA), attention, pooling (and its
        trained weights), ratio, window and memory embeddings. Projector and decoder are excluded: retraining them never forces
        re-ingestion. Cached; call ``reset_fingerprint()`` after training the encoder side.
        """
        if self._fingerprint is None:
            c = self.config
            parts = {
                "encoder_weights": tensor_digest(dict(self.encoder.state_dict())),
                "compressor": tensor_digest(self.trainable_state_dict()),
                "encoder_layers": len(_transformer_layers(self._base_encoder())),
                "pooling": c.pooling,
                "ratio": c.ratio,
                "encoder_window": c.encoder_window,
                "tokenizer": type(self.tokenizer).__name__ + str(len(self.tokenizer)),
            }
            if c.encoder_attention != "causal":  # absent for causal: fingerprints of earlier releases stay valid
                parts["encoder_attention"] = c.encoder_attention
            if c.memory_slots:
                parts["memory_slots"] = c.memory_slots
            if self.query_pool is not None:  # the last layer, held apart from the encoder's stack
                parts["query_layer"] = tensor_digest(dict(self.query_pool.layer.state_dict()))
            self._fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
        return self._fingerprint

    def reset_fingerprint(self) -> None:
        self._fingerprint = None

    def _base_encoder(self) -> nn.Module:
        return self.encoder.get_base_model() if hasattr(self.encoder, "get_base_model") else self.encoder

    # ------------------------------------------------------------------ persistence
    def save_trained(self, directory: str | Path) -> None:
        """Write only the trained encoder-side parts into a checkpoint directory."""
        from safetensors.torch import save_file

        from lclm_rag.checkpoint import save_adapter

        directory = Path(directory)
        state = {k: v.contiguous() for k, v in self.trainable_state_dict().items()}
        if state:
            save_file(state, str(directory / COMPRESSOR_WEIGHTS))
        if self.config.encoder_lora:
            save_adapter(self.encoder, directory / ENCODER_LORA_DIR)

    def load_trained(self, directory: str | Path) -> None:
        """Load the encoder-side parts the checkpoint trained.

        A part this config adds to the checkpoint's own (an encoder LoRA or memory tokens
        requested as an ``init_from`` override) keeps its fresh initialisation: a zero-init LoRA
        leaves the checkpoint's latents unchanged until it is trained.
        """
        from lclm_rag.checkpoint import load_adapter, load_config, load_safetensors, require_file, resolve_checkpoint

        directory = resolve_checkpoint(directory)  # a packaged checkpoint's name, or a path
        saved = load_config(directory)
        if self.memory_embeddings is not None and saved.pooling == "memory":
            state = load_safetensors(require_file(directory, COMPRESSOR_WEIGHTS))
            with torch.no_grad():
                self.memory_embeddings.copy_(state["memory_embeddings"])
        elif self.memory_embeddings is not None:
            logger.info("%s has no memory tokens: they start from their fresh initialisation", directory)
        if self.concat_pool is not None and saved.pooling == "concat" and saved.ratio == self.concat_pool.ratio:
            state = load_safetensors(require_file(directory, COMPRESSOR_WEIGHTS))
            with torch.no_grad():
                self.concat_pool.proj.weight.copy_(state["concat_pool"])
        elif self.concat_pool is not None:
            logger.info("%s has no concat pooling at 1:%d: it starts as mean pooling", directory, self.concat_pool.ratio)
        if self.config.encoder_lora and not saved.encoder_lora:
            logger.info("%s has no encoder LoRA: a fresh (zero-init) one is added", directory)
        elif self.config.encoder_lora:
            load_adapter(self.encoder, directory, ENCODER_LORA_DIR)
        self.reset_fingerprint()

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "LatentCompressor":
        """Load only the encoder side of a checkpoint (what ingestion needs)."""
        from lclm_rag.checkpoint import load_config

        config = load_config(directory)
        compressor = cls(config)
        compressor.load_trained(directory)
        return compressor
