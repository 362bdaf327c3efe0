"""The ``skim`` expansion policy: a probe, fitted on a training split, over what the decoder's skim shows.

The decoder reads every retrieved passage as latents; the attention its question's positions put
on each passage's span, per layer and head and calibrated by a content-free question
(`LatentDecoder.latent_attention`), is a relevance signal, but averaged over heads it is a weak
one: most heads attend by position, not content. The probe weighs each head, beside BM25 of the
question and the retrieval score (each standardised over the retrieved set), with one linear
layer fitted listwise (which of the k passages holds the answer) on training questions. It is
specific to the reader it was fitted on (projector and decoder LoRA), so it is saved next to that
checkpoint and checked against its fingerprint.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lclm_rag.errors import ConfigError, InputError
from lclm_rag.model import LatentContextModel
from lclm_rag.prompt import CONTENT_FREE_QUESTION

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


def skim_attention(model: LatentContextModel, question: str, latents: Sequence[torch.Tensor]) -> torch.Tensor:
    """The skim: (layers, heads, passages) attention of the question's positions on each passage's
    latents, less that of a content-free question (the passages prefilled once for both)."""
    return model.decoder.latent_attention(model.decoder.qa_segments(question, latents),
                                          model.decoder.qa_segments(CONTENT_FREE_QUESTION, latents), per_head=True)


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


_PROBES: "weakref.WeakKeyDictionary[LatentContextModel, SkimProbe]" = weakref.WeakKeyDictionary()


def use_skim_probe(model: LatentContextModel, probe: SkimProbe) -> None:
    """Make ``probe`` the one the ``skim`` policy applies with ``model`` (a checkpoint's own loads by itself)."""
    if probe.reader and probe.reader != model.decoder.fingerprint():
        raise ConfigError(f"the skim probe was fitted on reader {probe.reader[:12]}, not on this model's "
                          f"{model.decoder.fingerprint()[:12]}: fit one for it (lclm-rag fit-skim-probe)")
    _PROBES[model] = probe


def has_skim_probe(model: LatentContextModel) -> bool:
    """Whether the ``skim`` policy can run with ``model`` (a probe set, or one saved in its checkpoint)."""
    directory = getattr(model, "directory", None)
    return model in _PROBES or (directory is not None and (Path(directory) / SKIM_PROBE_FILE).is_file())


def skim_probe(model: LatentContextModel) -> SkimProbe:
    """The probe set with `use_skim_probe`, else the one saved in the model's checkpoint directory."""
    if model not in _PROBES:
        directory = getattr(model, "directory", None)
        if directory is None:
            raise ConfigError("the skim policy needs a fitted probe: this model was not loaded from a checkpoint "
                              "directory (fit one with lclm-rag fit-skim-probe, or pass it to use_skim_probe)")
        use_skim_probe(model, SkimProbe.from_pretrained(directory))
    return _PROBES[model]
