"""Plots of evaluation results."""

from __future__ import annotations

from pathlib import Path

COST_LABELS = {"ttft_s": "time to first token per question (s)", "prompt_positions": "decoder prompt positions per question"}


def plot_quality_cost(result: dict, png_path: str | Path, metric: str = "f1", cost: str = "ttft_s") -> None:
    """Quality against a cost (``ttft_s`` or ``prompt_positions``), one point per mode, with the
    Pareto front drawn over the retrieved modes (gold-passage modes are hollow references)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if cost not in COST_LABELS:
        raise ValueError(f"cost must be one of {sorted(COST_LABELS)}, got {cost!r}")
    rows = sorted(result["scores"], key=lambda r: r[cost])
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(rows):
        oracle = r["mode"].startswith("gold")  # gold passage given, not retrieved: a reference, not an option
        ax.scatter(r[cost], r[metric], s=30, facecolors="none" if oracle else None, edgecolors="C0" if oracle else None)
        ax.annotate(r["mode"], (r[cost], r[metric]), fontsize=7, xytext=(4, 3 - 9 * (i % 2)), textcoords="offset points")
    front, best = [], -1.0
    for r in rows:  # cheapest first: on the front if nothing cheaper is at least as good
        if not r["mode"].startswith("gold") and r[metric] > best:
            front.append(r)
            best = r[metric]
    ax.plot([r[cost] for r in front], [r[metric] for r in front], "k--", lw=0.8, label="Pareto front (hollow: gold passage, reference)")
    ax.set_xlabel(COST_LABELS[cost])
    ax.set_ylabel({"f1": "SQuAD F1", "exact_match": "exact match", "answer_contained": "answer contained"}.get(metric, metric))
    ax.set_title(f"{Path(result['data']).name}: {result['n']} questions, top-{result['top_k']}, {result['max_new_tokens']} new tokens",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
