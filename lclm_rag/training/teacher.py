"""Teacher answers for distillation (PISCO): a full-text reader's greedy answers as QA targets."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from lclm_rag.model import LatentContextModel
from lclm_rag.training.examples import Example
from lclm_rag.training.recipe import TrainConfig


class TeacherAnswers:
    """PISCO's targets: what a full-text teacher answers to the same question over the same passages.

    The teacher reads the passages as text with the student's prompt; its greedy answer replaces the
    gold one as the qa target (an empty answer teaches the student to stop). Answers are generated
    once per example and cached in ``output_dir`` (one file per process), so a resumed run trains
    on the same labels without generating them again. Targets are text, so any decoder can teach.
    """

    def __init__(self, cfg: TrainConfig, student: LatentContextModel, out: Path, rank: int, device) -> None:
        if cfg.teacher == "base":
            self.model, self.context = student, student.decoder.base
        else:
            self.model, self.context = LatentContextModel.from_pretrained(cfg.teacher).to(device).eval(), contextlib.nullcontext
        self.max_new_tokens = cfg.teacher_max_new_tokens
        self.path = out / f"teacher_answers.{rank}.jsonl"
        self.answers: dict[str, str] = {}
        for path in sorted(out.glob("teacher_answers.*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a kill can cut the last line; it is regenerated
                    row = json.loads(line)
                    self.answers[row["key"]] = row["answer"]

    @staticmethod
    def key(example: Example) -> str:
        return hashlib.sha1("\x00".join([example.user_message, *example.passages]).encode()).hexdigest()

    @torch.no_grad()
    def relabel(self, examples: list[Example]) -> list[Example]:
        """The examples with each qa target replaced by the teacher's answer (others unchanged)."""
        missing = {self.key(ex): ex for ex in examples if ex.task == "qa" and self.key(ex) not in self.answers}
        if missing:
            decoder = self.model.decoder
            was_training = decoder.training
            decoder.eval()
            with self.context():
                prompts = [decoder.segments(ex.user_message, ex.passages) for ex in missing.values()]
                texts = decoder.generate_from_segments(prompts, max_new_tokens=self.max_new_tokens)
            decoder.train(was_training)
            with self.path.open("a", encoding="utf-8") as fh:
                for key, text in zip(missing, texts, strict=True):
                    self.answers[key] = text
                    fh.write(json.dumps({"key": key, "answer": text}) + "\n")
        return [dataclasses.replace(ex, target=self.answers[self.key(ex)]) if ex.task == "qa" else ex for ex in examples]
