"""Distillation from a reader of the passages as text: its greedy answers as QA targets (PISCO), or
its distribution on each answer token as a KL target (a stage's ``text_kl``)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from lclm_rag.model import LatentContextModel
from lclm_rag.training.examples import Example
from lclm_rag.training.objectives import target_log_probs
from lclm_rag.training.recipe import TrainConfig


def text_reader(cfg: TrainConfig, student: LatentContextModel, device) -> tuple[LatentContextModel, object]:
    """The model that reads the passages as text and the context it reads in: ``teacher: "base"`` is
    the student's own decoder with its adapters off; a checkpoint is loaded once, adapters on."""
    if cfg.teacher == "base":
        return student, student.decoder.base
    return LatentContextModel.from_pretrained(cfg.teacher).to(device).eval(), contextlib.nullcontext


class TeacherAnswers:
    """PISCO's targets: what a full-text teacher answers to the same question over the same passages.

    The teacher reads the passages as text with the student's prompt; its greedy answer replaces the
    gold one as the qa target (an empty answer teaches the student to stop). Answers are generated
    once per example and cached in ``output_dir`` (one file per process), so a resumed run trains
    on the same labels without generating them again. Targets are text, so any decoder can teach.
    """

    def __init__(self, cfg: TrainConfig, student: LatentContextModel, out: Path, rank: int, device) -> None:
        self.model, self.context = text_reader(cfg, student, device)
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


class TextReaderLogProbs:
    """What the text reader puts on each token of a QA example's target, read over the same prompt with
    the passages as text: the KL target that teaches a whole distribution per answer token, where
    the gold answer teaches one token. Computed each step (the targets differ every step)."""

    def __init__(self, cfg: TrainConfig, student: LatentContextModel, device) -> None:
        self.model, self.context = text_reader(cfg, student, device)

    @torch.no_grad()
    def __call__(self, examples: list[Example]) -> list[torch.Tensor | None]:
        """Per example its reference log-probabilities (None for other tasks than qa)."""
        qa = [i for i, ex in enumerate(examples) if ex.task == "qa"]
        out: list[torch.Tensor | None] = [None] * len(examples)
        if not qa:
            return out
        decoder = self.model.decoder
        was_training = decoder.training
        decoder.eval()
        with self.context():
            prompts = [decoder.segments(examples[i].user_message, examples[i].passages) for i in qa]
            for i, log_probs in zip(qa, target_log_probs(decoder, prompts, [examples[i].target for i in qa]), strict=True):
                out[i] = log_probs
        decoder.train(was_training)
        return out
