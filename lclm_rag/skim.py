"""The ``skim`` expansion policy's probe: a listwise linear scorer, fitted on a training split.

The decoder reads every retrieved passage as latents; the attention its question's positions put
on each passage's span, per layer and head and calibrated by a content-free question
(`lclm_rag.policies.question_attention`), is a relevance signal, but averaged over heads it is a
weak one: most heads attend by position, not content. The probe weighs each head, beside BM25 of
the question and the retrieval score (each standardised over the retrieved set), with one linear
layer fitted listwise (which of the k passages holds the answer) on training questions. It is
specific to the reader it was fitted on (projector and decoder LoRA), so it belongs to that
checkpoint: ``LatentContextModel.from_pretrained`` loads it, ``save_pretrained`` writes it, and
it is checked against the reader's fingerprint before use. This module sits in the model layer
and imports no model: the model holds a probe, not the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lclm_rag.errors import ConfigError, InputError

SKIM_PROBE_FILE = "skim_probe.safetensors"
ATTENTION_SCALE = 10.0  # calibrated masses are ~0.01: scaled so one L2 penalty suits every feature


@dataclass
class SkimProbe:
    """Listwise linear scorer over (per-head attention masses, BM25, retrieval score) of each passage."""

    weights: torch.Tensor  # (layers * heads + 2,): every head's calibrated attention mass, z(BM25), z(score)
    reader: str  # `LatentDecoder.fingerprint()` of the reader whose attention it was fitted on
    trained_on: str = ""  # training files and question counts, for the record

    def scores(self, heads: torch.Tensor, bm25: Sequence[float], score: Sequence[float | None]) -> list[float]:
        """Relevance of each passage from its (layers, heads, passages) attention masses, BM25 and retrieval score."""
        x = skim_features(heads, bm25, score)
        if x.shape[-1] != self.weights.shape[0]:
            raise ConfigError(f"the skim probe reads {self.weights.shape[0] - 2} attention heads but this decoder has "
                              f"{x.shape[-1] - 2}: fit a probe for it (lclm-rag fit-skim-probe)")
        return (x @ self.weights.to(x.dtype)).tolist()

    def check_reader(self, reader: str) -> None:
        """Refuse to score for a reader other than the one the probe was fitted on."""
        if self.reader and self.reader != reader:
            raise ConfigError(f"the skim probe was fitted on reader {self.reader[:12]}, not on this model's "
                              f"{reader[:12]}: fit one for it (lclm-rag fit-skim-probe)")

    def save_pretrained(self, directory: str | Path) -> Path:
        path = Path(directory) / SKIM_PROBE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"weights": self.weights.float().contiguous()}, path,
                  metadata={"reader": self.reader, "trained_on": self.trained_on})
        return path

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "SkimProbe":
        path = Path(directory) / SKIM_PROBE_FILE
        if not path.is_file():
            raise ConfigError(f"no skim probe at {path}: fit one with lclm-rag fit-skim-probe")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        return cls(load_file(path)["weights"], metadata.get("reader", ""), metadata.get("trained_on", ""))


def _z(values: torch.Tensor) -> torch.Tensor:
    spread = values.std(unbiased=False)
    return (values - values.mean()) / spread if spread > 0 else torch.zeros_like(values)


def skim_features(heads: torch.Tensor, bm25: Sequence[float], score: Sequence[float | None]) -> torch.Tensor:
    """(passages, layers * heads + 2) features of one retrieved set."""
    heads = torch.as_tensor(heads, dtype=torch.float64)
    per_head = heads.reshape(-1, heads.shape[-1]).T * ATTENTION_SCALE
    lexical = _z(torch.tensor(bm25, dtype=torch.float64))
    dense = _z(torch.tensor([s if s is not None else 0.0 for s in score], dtype=torch.float64))
    return torch.cat([per_head, lexical[:, None], dense[:, None]], 1)


def fit_listwise(features: Sequence[torch.Tensor], gold: Sequence[Sequence[bool]], l2: float = 0.01) -> torch.Tensor:
    """Weights maximising the gold passage's softmax probability within each retrieved set (L2-penalised).

    Sets without a gold passage teach nothing and are skipped; with several, the target is shared.
    """
    keep = [i for i, g in enumerate(gold) if any(g)]
    if not keep:
        raise InputError("no training question has its gold passage among the retrieved: nothing to fit")
    x = torch.stack([torch.as_tensor(features[i], dtype=torch.float64) for i in keep])
    target = torch.tensor([[float(v) for v in gold[i]] for i in keep], dtype=torch.float64)
    target = target / target.sum(1, keepdim=True)
    w = torch.zeros(x.shape[-1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -(target * torch.log_softmax(x @ w, 1)).sum(1).mean() + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()
