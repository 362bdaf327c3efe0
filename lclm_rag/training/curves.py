"""Training curves: loss, and held-out restoration accuracy beside its control."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lclm_rag.data import load_jsonl


def plot_curves(log_path: str | Path, png_path: str | Path) -> None:
    """Training loss / token accuracy and held-out restoration accuracy (with its control)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_jsonl(log_path)
    train_rows = [r for r in rows if r["type"] == "train" and "token_acc" in r]  # alignment steps log an MSE, not this loss
    eval_rows = [r for r in rows if r["type"] == "eval" and "restoration_acc" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if train_rows:
        x = [r["samples"] for r in train_rows]
        k = max(1, len(train_rows) // 50)
        smooth = np.convolve([r["loss"] for r in train_rows], np.ones(k) / k, mode="valid")  # no edge artefacts
        axes[0].plot(x[k - 1 :], smooth, label=f"train loss (moving average of {k} steps)")
        axes[0].set_xlabel("training samples")
        axes[0].legend()
    if eval_rows:
        x = [r["global_step"] for r in eval_rows]
        axes[1].plot(x, [r["restoration_acc"] for r in eval_rows], "o-", label="restoration acc (own latents)")
        axes[1].plot(x, [r["restoration_acc_control"] for r in eval_rows], "x--", label="control (another passage's latents)")
        last = None  # where each stage (and, in a ratio curriculum, each ratio) starts
        for r in rows:
            if r["type"] == "train" and (r["stage"], r.get("ratio")) != last:
                last = (r["stage"], r.get("ratio"))
                axes[1].axvline(r["global_step"], color="grey", lw=0.6)
                label = r["stage"] + (f" 1:{r['ratio']}" if "ratio" in r else "")
                axes[1].annotate(label, (r["global_step"], 0.02), fontsize=7, color="grey", rotation=90)
        axes[1].set_xlabel("step")
        axes[1].set_ylim(0, 1)
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
