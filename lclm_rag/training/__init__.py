"""Training: alignment -> restoration -> continuation -> instruction (QA) tuning, resumable, one CPU or many GPUs.

Stages (Squid; LCLM; PISCO): the decoder learns to read latents by rebuilding the passage from
them (restoration), continuing it (continuation), then answering questions over several
passages given as latents, loss on the answer only (qa), on gold answers or, as PISCO does, on
the answers a full-text teacher gives (``answers="teacher"``). Which parts train is set per stage.
Devices, mixed precision and DDP come from ``accelerate``.

Two stage options make restoration learnable on a small budget:
``alignment`` regresses the projector onto the decoder's own input embeddings of each latent's
tokens (encoder and decoder must share a tokenizer), and a per-stage ``ratio`` lets a run start
at 1:1, where an aligned projector is read at once, and compress step by step (1:1 -> 1:2 -> 1:4).

Modules: ``recipe`` (settings), ``examples`` (data streams), ``objectives`` (losses), ``parts``
(what trains), ``teacher`` (distillation labels), ``loop`` (the run), ``heldout`` and ``curves``;
``one_shot`` and ``transfer`` carry a run to a GPU machine that reaches nothing (``scripts/gpu_one_shot.py``).
"""

from lclm_rag.training.heldout import evaluate_heldout
from lclm_rag.training.loop import main_from_config, train
from lclm_rag.training.recipe import StageConfig, TrainConfig, load_recipe

__all__ = ["StageConfig", "TrainConfig", "evaluate_heldout", "load_recipe", "main_from_config", "train"]
