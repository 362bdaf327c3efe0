"""Pilot of encoder designs at a matched budget: which compressor should be trained for real?

Every arm is a recipe in ``recipes/pilot/`` (the same base: same samples, steps and curriculum,
from a fresh projector), differing only in the encoder: attention (causal | bidirectional),
pooling (mean | concat) and depth. For each arm this trains (resumable: re-run to continue),
then measures on the recipe's held-out passages restoration accuracy overall, on digit tokens and
on capitalised-word tokens (each with its control: another passage's latents); on squad_dev gold
questions the QA scores with their diagnostics (answers not in the passage, numeric EM,
capitalised EM) beside the control; and compression passages/s. Results go to
``runs/pilot/<arm>/pilot.json`` and the table to ``runs/pilot/table.md`` (run from the repository root)::

    .venv/bin/python scripts/pilot_encoder_designs.py                 # all arms in recipes/pilot/
    .venv/bin/python scripts/pilot_encoder_designs.py --arms causal-mean-l2 --questions 200
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from lclm_rag.data import sample_records
from lclm_rag.evaluation import evaluate_gold_passage, restoration_breakdown
from lclm_rag.evaluation.measure import markdown_table
from lclm_rag.model import LatentContextModel
from lclm_rag.training import TrainConfig, train
from lclm_rag.training.examples import chunk_texts, corpus_split

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes" / "pilot"
ARMS = ["causal-mean-l2", "bidirectional-concat-l2", "bidirectional-mean-l8", "bidirectional-concat-l8"]


def heldout_restoration(model: LatentContextModel, cfg: TrainConfig, passages: int, batch_size: int = 32) -> dict:
    chunks = chunk_texts(corpus_split(cfg)[0], model.compressor.tokenizer, cfg.chunk_tokens)[:passages]
    totals: dict[str, dict[str, list[int]]] = {"own": {}, "control": {}}
    for start in range(0, len(chunks) - batch_size + 1, batch_size):
        batch = chunks[start : start + batch_size]
        for label, control in (("own", False), ("control", True)):
            for cls, row in restoration_breakdown(model, batch, control=control).items():
                acc = totals[label].setdefault(cls, [0, 0])
                acc[0] += row["correct"]
                acc[1] += row["total"]
    return {label: {cls: k / n for cls, (k, n) in rows.items()} | {"tokens": rows["all"][1]} for label, rows in totals.items()}


def compression_speed(model: LatentContextModel, cfg: TrainConfig, passages: int = 64) -> float:
    chunks = chunk_texts(corpus_split(cfg)[0], model.compressor.tokenizer, 128)[:passages]
    model.compress(chunks[:8])  # warm-up
    start = time.perf_counter()
    model.compress(chunks, batch_size=16)
    return len(chunks) / (time.perf_counter() - start)


def run_arm(name: str, questions: int, heldout: int, data: Path) -> dict:
    """Train (or resume) one arm, then measure; results are saved after each part, so a stopped
    run keeps what it measured and a re-run only does what is missing."""
    cfg = TrainConfig.load(RECIPES / f"{name}.json")
    out_file = Path(cfg.output_dir) / "pilot.json"
    result = json.loads(out_file.read_text()) if out_file.exists() else {}
    if "restoration" in result and (questions == 0 or result.get("questions", {}).get("n") == questions):
        return result
    final = train(cfg)
    model = LatentContextModel.from_pretrained(final).eval()
    if "restoration" not in result:
        with torch.no_grad():
            result = {"arm": name, "model": {k: cfg.model.get(k) for k in ("encoder_attention", "pooling", "encoder_layers", "ratio")},
                      "fingerprint": model.fingerprint(),
                      "train_seconds": round(json.loads((Path(cfg.output_dir) / "checkpoint" / "state.json").read_text())["elapsed"], 1),
                      "restoration": heldout_restoration(model, cfg, heldout), "compress_passages_per_s": round(compression_speed(model, cfg), 2)}
        out_file.write_text(json.dumps(result, indent=2))
    if questions:
        records = sample_records(data, questions, seed=0)
        with torch.no_grad():
            result["qa"] = {}
            for mode in ("latent", "latent-control"):
                scores, preds = evaluate_gold_passage(model, records, mode)
                result["qa"][mode] = scores.as_dict() | {"predictions": preds}
        result["questions"] = {"data": str(data), "n": len(records), "seed": 0}
        out_file.write_text(json.dumps(result, indent=2))
    return result


def _pct(row: dict | None, key: str) -> str:
    return "n/a" if not row or row.get(key) is None else f"{row[key]:.1%}"


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        own, ctl = r["restoration"]["own"], r["restoration"]["control"]
        lat, lctl = r.get("qa", {}).get("latent"), r.get("qa", {}).get("latent-control")
        rows.append({
            "arm": r["arm"], "restore": f"{own['all']:.3f} ({ctl['all']:.3f})",
            "restore digits": f"{own['digit']:.3f} ({ctl['digit']:.3f})",
            "restore capitalised": f"{own['capitalised']:.3f} ({ctl['capitalised']:.3f})",
            "contained": f"{_pct(lat, 'answer_contained')} ({_pct(lctl, 'answer_contained')})", "EM": _pct(lat, "exact_match"),
            "F1": "n/a" if not lat else f"{lat['f1']:.3f} ({lctl['f1']:.3f})", "not in passage": _pct(lat, "not_in_passage"),
            "numeric EM": _pct(lat, "numeric_em"), "capitalised EM": _pct(lat, "capitalised_em"),
            "words": "n/a" if not lat else f"{lat['mean_answer_words']:.1f}",
            "passages/s": r["compress_passages_per_s"], "train s": r["train_seconds"],
        })
    return markdown_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=ARMS)
    parser.add_argument("--questions", type=int, default=200, help="squad_dev gold questions per arm (seed 0; 0: restoration only)")
    parser.add_argument("--heldout", type=int, default=128, help="held-out passages for restoration")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "qa" / "squad_dev.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    results = []
    for name in args.arms:
        results.append(run_arm(name, args.questions, args.heldout, args.data))
        Path("runs/pilot/table.md").write_text(table(results) + "\n")
        print(table(results), flush=True)


if __name__ == "__main__":
    main()
