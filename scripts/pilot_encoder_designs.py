"""Pilot of encoder designs at a matched budget: which compressor should be trained for real?

Every arm is a recipe in ``recipes/pilot/`` (the same base: same samples, steps and curriculum,
from a fresh projector), differing only in the encoder: attention (causal | bidirectional),
pooling (mean | concat) and depth. For each arm this trains (resumable: re-run to continue),
then measures on the recipe's held-out passages restoration accuracy overall, on digit tokens and
on capitalised-word tokens (each with its control: another passage's latents); on squad_dev gold
questions the QA scores with their diagnostics (answers not in the passage, numeric EM,
capitalised EM) beside the control; and compression passages/s. Results go to
``runs/pilot/<arm>/pilot.json`` and the table to ``runs/pilot/table.md``::

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
    out_file = ROOT / "runs" / "pilot" / name / "pilot.json"
    if out_file.exists():
        return json.loads(out_file.read_text())
    cfg = TrainConfig.load(ROOT / "recipes" / "pilot" / f"{name}.json")
    final = train(cfg)
    train_seconds = json.loads((Path(cfg.output_dir) / "checkpoint" / "state.json").read_text())["elapsed"]
    model = LatentContextModel.from_pretrained(final).eval()
    with torch.no_grad():
        restoration = heldout_restoration(model, cfg, heldout)
        records = sample_records(data, questions, seed=0)
        qa = {}
        for mode in ("latent", "latent-control"):
            scores, preds = evaluate_gold_passage(model, records, mode)
            qa[mode] = scores.as_dict() | {"predictions": preds}
        speed = compression_speed(model, cfg)
    result = {"arm": name, "model": {k: cfg.model.get(k) for k in ("encoder_attention", "pooling", "encoder_layers", "ratio")},
              "fingerprint": model.fingerprint(), "train_seconds": round(train_seconds, 1),
              "restoration": restoration, "qa": qa, "compress_passages_per_s": round(speed, 2),
              "questions": {"data": str(data), "n": len(records), "seed": 0}}
    out_file.write_text(json.dumps(result, indent=2))
    return result


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        own, ctl, lat, lctl = r["restoration"]["own"], r["restoration"]["control"], r["qa"]["latent"], r["qa"]["latent-control"]
        rows.append({
            "arm": r["arm"], "restore": f"{own['all']:.3f} ({ctl['all']:.3f})",
            "restore digits": f"{own['digit']:.3f} ({ctl['digit']:.3f})",
            "restore capitalised": f"{own['capitalised']:.3f} ({ctl['capitalised']:.3f})",
            "contained": f"{lat['answer_contained']:.1%} ({lctl['answer_contained']:.1%})",
            "EM": f"{lat['exact_match']:.1%}", "F1": f"{lat['f1']:.3f} ({lctl['f1']:.3f})",
            "not in passage": f"{lat['not_in_passage']:.1%}", "numeric EM": f"{lat['numeric_em']:.1%}",
            "capitalised EM": f"{lat['capitalised_em']:.1%}", "words": f"{lat['mean_answer_words']:.1f}",
            "passages/s": r["compress_passages_per_s"], "train s": r["train_seconds"],
        })
    return markdown_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=ARMS)
    parser.add_argument("--questions", type=int, default=200, help="squad_dev gold questions per arm (seed 0)")
    parser.add_argument("--heldout", type=int, default=128, help="held-out passages for restoration")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "qa" / "squad_dev.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    results = []
    for name in args.arms:
        results.append(run_arm(name, args.questions, args.heldout, args.data))
        (ROOT / "runs" / "pilot" / "table.md").write_text(table(results) + "\n")
        print(table(results), flush=True)


if __name__ == "__main__":
    main()
