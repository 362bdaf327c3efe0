"""Can the decoder's skim pick the passage to expand? A probe on its attention, trained on a training split.

For each question (top-k dense retrieval over the distinct contexts of its file), the decoder reads
every retrieved passage as latents and `LatentDecoder.latent_attention` gives, per layer and head,
the attention mass of the question's positions on each passage, calibrated by a content-free
question. A listwise softmax regression (which of the k passages is the gold one) is fitted on the
training file's questions and scored on the evaluation file's, alone and beside BM25 of the
question and the retrieval score, against the policies that need no model (``score``, ``lexical``,
``fused``): the share of questions whose gold passage is ranked first (second), with paired
differences and their standard errors. Features are cached in ``--workdir``; run from the root::

    .venv/bin/python scripts/skim_attention_probe.py --checkpoint smollm2-135m-r4 \\
        --train ../shared/data/qa/squadshifts_new_wiki.jsonl --train-limit 400 \\
        --eval ../shared/data/qa/squad_dev.jsonl --eval-limit 500 --workdir runs/skim-probe
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from lclm_rag.model import LatentContextModel
from lclm_rag.policies import fused_relevance
from lclm_rag.skim import fit_listwise
from lclm_rag.training.skim_probe import skim_examples

FEATURE_SETS = {  # name: (per-head attention, mean attention, BM25, retrieval score)
    "attention (mean of heads)": (False, True, False, False),
    "attention (probe over heads)": (True, False, False, False),
    "BM25 + attention probe": (True, False, True, False),
    "BM25 + score + attention (mean)": (False, True, True, True),
    "BM25 + score + attention probe": (True, False, True, True),
}


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-9)


def features(rows: list[dict], kind: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """(questions, passages, features)."""
    per_head, mean, bm25, score = kind
    heads = np.array([r["heads"] for r in rows])  # q, layers, heads, passages
    parts = []
    if per_head:
        q, layers, h, p = heads.shape
        parts.append(heads.reshape(q, layers * h, p).transpose(0, 2, 1) * 10)
    if mean:
        parts.append(_z(heads.mean((1, 2)))[..., None])
    if bm25:
        parts.append(_z(np.array([r["bm25"] for r in rows]))[..., None])
    if score:
        parts.append(_z(np.array([r["score"] for r in rows]))[..., None])
    return np.concatenate(parts, -1)


def fit(x: np.ndarray, gold: np.ndarray, l2: float) -> np.ndarray:
    return fit_listwise(list(torch.tensor(x)), gold.astype(bool).tolist(), l2).numpy()


def hits(keys: np.ndarray, gold: np.ndarray, n: int) -> np.ndarray:
    order = np.argsort(-(keys - 1e-9 * np.arange(keys.shape[1])), 1, kind="stable")[:, :n]
    return np.take_along_axis(gold, order, 1).any(1).astype(float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="smollm2-135m-r4")
    parser.add_argument("--train", type=Path, nargs="+", required=True, help="training files (--train-limit questions of each)")
    parser.add_argument("--train-limit", type=int, default=400)
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--eval-limit", type=int, default=500)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--l2", type=float, default=0.03)
    parser.add_argument("--workdir", type=Path, default=Path("runs/skim-probe"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = LatentContextModel.from_pretrained(args.checkpoint).eval()
    train = [row for path in args.train for row in skim_examples(model, path, args.train_limit, seed=1, top_k=args.top_k, workdir=args.workdir)]
    dev = skim_examples(model, args.eval, args.eval_limit, seed=0, top_k=args.top_k, workdir=args.workdir)
    g_train, g_dev = (np.array([r["gold"] for r in rows], dtype=float) for rows in (train, dev))
    bm25, score = (np.array([r[k] for r in dev]) for k in ("bm25", "score"))
    blind = {"score": score, "lexical": bm25, "fused": np.array([fused_relevance(r["bm25"], r["score"]) for r in dev])}
    table = []
    for name, kind in FEATURE_SETS.items():
        w = fit(features(train, kind), g_train, args.l2)
        keys = features(dev, kind) @ w
        row = {"ranker": name, "features": int(len(w))}
        for n in (1, 2):
            got = hits(keys, g_dev, n)
            row[f"gold_in_top{n}"] = got.mean()
            for ref, ref_keys in blind.items():
                d = got - hits(ref_keys, g_dev, n)
                row[f"top{n}_minus_{ref}"] = [d.mean(), d.std(ddof=1) / math.sqrt(len(d))]
        table.append(row)
    for ref, ref_keys in blind.items():
        table.append({"ranker": ref, "features": 0, **{f"gold_in_top{n}": hits(ref_keys, g_dev, n).mean() for n in (1, 2)}})
    result = {"checkpoint": model.fingerprint(), "train": [str(p) for p in args.train], "train_n": len(train), "eval": str(args.eval),
              "eval_n": len(dev), "top_k": args.top_k, "l2": args.l2, "gold_retrieved": float(g_dev.any(1).mean()), "rankers": table}
    (args.workdir / "probe.json").write_text(json.dumps(result, indent=2))
    for row in table:
        diffs = "  ".join(f"{k.replace('_minus_', ' - ')} {v[0]:+.3f} ({v[1]:.3f})" for k, v in row.items() if "_minus_" in k)
        print(f"{row['ranker']:34s} top1 {row['gold_in_top1']:.3f} top2 {row['gold_in_top2']:.3f}  {diffs}")


if __name__ == "__main__":
    main()
