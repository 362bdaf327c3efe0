"""A run's compact candidate: its trained parts in float16 and where it stood, small enough to commit.

A run's full checkpoint (``OUTPUT_DIR/checkpoint``: float32 weights, optimizer moments, RNG state)
is ~60 MB for the release's model and lives outside git, on the machine that trains. A work
period may end on that machine and the next start on a fresh clone, so a long run also leaves a
*candidate*: ``save_pretrained``'s files with every tensor in float16 (~12 MB), the run's state
(stage, step, examples seen), its recipe and its log. ``lclm-rag train --config R --resume-from
DIR`` continues the run from it: the same recipe, the same example stream (examples are drawn by
position, so none is repeated or skipped) and the same learning-rate schedule; only Adam's
moments start afresh. A candidate is also a checkpoint: ``--checkpoint DIR/model`` evaluates it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lclm_rag.errors import CheckpointError

MODEL_DIR = "model"
STATE_FILE = "state.json"
LOG_FILE = "log.jsonl"


def _to_float16(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}, str(path))


def export_candidate(checkpoint: str | Path, output: str | Path, log: str | Path | None = None,
                     recipe: dict | None = None) -> Path:
    """Write a run checkpoint (``OUTPUT_DIR/checkpoint``) as a compact candidate at ``output``."""
    checkpoint, output = Path(checkpoint), Path(output)
    if not (checkpoint / STATE_FILE).is_file() or not (checkpoint / MODEL_DIR).is_dir():
        raise CheckpointError(f"{checkpoint} is not a run checkpoint (no {STATE_FILE} and {MODEL_DIR}/)")
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(checkpoint / MODEL_DIR, partial / MODEL_DIR)
    for weights in (partial / MODEL_DIR).rglob("*.safetensors"):
        _to_float16(weights)
    shutil.copy(checkpoint / STATE_FILE, partial / STATE_FILE)
    if log is not None and Path(log).is_file():
        state = json.loads((checkpoint / STATE_FILE).read_text())
        rows = [line for line in Path(log).read_text().splitlines() if json.loads(line)["global_step"] <= state["global_step"]]
        (partial / LOG_FILE).write_text("".join(r + "\n" for r in rows))
    if recipe is not None:
        (partial / "train_config.json").write_text(json.dumps(recipe, indent=2) + "\n")
    shutil.rmtree(output, ignore_errors=True)
    partial.rename(output)
    return output


def read_candidate(directory: str | Path) -> tuple[Path, dict]:
    """(model directory, run state) of a candidate, checked."""
    directory = Path(directory)
    state_path = directory / STATE_FILE
    if not state_path.is_file() or not (directory / MODEL_DIR).is_dir():
        raise CheckpointError(f"{directory} is not a run candidate (no {STATE_FILE} and {MODEL_DIR}/): "
                              "give a directory written by `lclm-rag train --export-candidate`")
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{state_path} is not valid JSON: {exc}") from exc
    if not isinstance(state, dict) or not {"stage", "step", "global_step"} <= set(state):
        raise CheckpointError(f"{state_path} does not hold a run state (stage, step, global_step)")
    return directory / MODEL_DIR, state
