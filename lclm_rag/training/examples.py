"""Training examples: deterministic streams of restoration, continuation and QA examples per stage."""

from __future__ import annotations

import random
from dataclasses import dataclass

from lclm_rag.chunking import chunk_text
from lclm_rag.data import load_records, shared_contexts
from lclm_rag.errors import ConfigError
from lclm_rag.model import LatentContextModel
from lclm_rag.prompt import continuation_message, restoration_message
from lclm_rag.sidecar import key_terms, sidecar_text
from lclm_rag.training.recipe import StageConfig, TrainConfig


@dataclass
class Example:
    passages: list[str]  # compressed into latents, one slot each
    user_message: str  # with slot_marker(i) placeholders
    target: str  # what the decoder must produce (loss only here)
    task: str = "restoration"  # restoration | continuation | qa


def restoration_example(passage: str, terms: int = 0) -> Example:
    return Example([passage], restoration_message(sidecar_text(key_terms(passage, terms)) if terms else ""), passage)


def continuation_example(first: str, second: str) -> Example:
    return Example([first], continuation_message(), second, task="continuation")


def qa_example(model: LatentContextModel, record: dict, pool: list[str], distractors: int, rng: random.Random,
               terms: int = 0) -> Example:
    """The question over its gold passage and ``distractors`` others, shuffled; ``terms``: each passage's sidecar."""
    passages = [record["context"]] + rng.sample(pool, distractors)
    rng.shuffle(passages)
    notes = [sidecar_text(key_terms(p, terms)) for p in passages] if terms else None
    return Example(passages, model.decoder.qa_user_message(record["question"], len(passages), notes), record["answers"][0], task="qa")


def stage_qa_example(model: LatentContextModel, stage: StageConfig, record: dict, contexts: list[str],
                     rng: random.Random) -> Example:
    """A QA stage's example of ``record``: its distractors drawn from ``contexts`` (never its own), its sidecar."""
    pool = [c for c in rng.sample(contexts, min(len(contexts), stage.distractors + 1)) if c != record["context"]]
    return qa_example(model, record, pool, min(stage.distractors, len(pool)), rng, stage.key_terms)


def corpus_split(cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """The recipe's seeded document split: (held-out 1%, training), the same in every run of it."""
    docs = [r for src in cfg.corpus for r in load_records(src)]
    random.Random(cfg.seed).shuffle(docs)
    held_out = max(1, len(docs) // 100) if docs else 0
    return docs[:held_out], docs[held_out:]


def chunk_texts(docs: list[dict], tokenizer, chunk_tokens: int) -> list[str]:
    return [c.text for d in docs for c in chunk_text(d["text"], tokenizer, chunk_tokens, overlap=0)]


class ExampleSource:
    """Deterministic example streams per stage; position = examples consumed (for resume)."""

    def __init__(self, cfg: TrainConfig, model: LatentContextModel) -> None:
        self.cfg, self.model = cfg, model
        tok = model.compressor.tokenizer
        self.eval_docs, train_docs = corpus_split(cfg)
        self.chunks: list[str] = []
        self.pairs: list[tuple[str, str]] = []
        for doc in train_docs:
            pieces = [c.text for c in chunk_text(doc["text"], tok, cfg.chunk_tokens, overlap=0)]
            self.chunks.extend(pieces)
            self.pairs.extend(zip(pieces, pieces[1:]))
        self.heldout_chunks = chunk_texts(self.eval_docs, tok, cfg.chunk_tokens)
        self.eval_chunks = self.heldout_chunks[: cfg.eval_passages]
        self.qa = [r for src in cfg.qa_data for r in load_records(src) if r.get("answers")]
        if cfg.qa_eval_file and self.qa:
            overlap = shared_contexts(self.qa, cfg.qa_eval_file)
            if overlap:
                raise ConfigError(f"qa_data shares {overlap} passages with qa_eval_file {cfg.qa_eval_file}: "
                                  "the evaluation would measure memorisation")
        self.qa_pool = sorted({r["context"] for r in self.qa})
        self.questions: dict[str, list[dict]] = {}  # context -> its records, in file order
        for r in self.qa:
            self.questions.setdefault(r["context"], []).append(r)

    def example(self, stage_index: int, stage: StageConfig, position: int) -> Example:
        seed = self.cfg.seed if self.cfg.data_seed is None else self.cfg.data_seed
        rng = random.Random(f"{seed}-{stage_index}-{position}")
        if stage.name != "restoration" and rng.random() < stage.mix_restoration:
            return restoration_example(rng.choice(self._need(self.chunks, "corpus")), stage.key_terms)
        if stage.name in ("restoration", "alignment"):
            return restoration_example(self._need(self.chunks, "corpus")[rng.randrange(len(self.chunks))], stage.key_terms)
        if stage.name == "continuation":
            return continuation_example(*self._need(self.pairs, "corpus")[rng.randrange(len(self.pairs))])
        k = stage.questions_per_context
        if k > 1:  # the group's passages come from its own stream; each position asks the next question
            group, slot = divmod(position, k)
            rng = random.Random(f"{seed}-{stage_index}-context-{group}")
            first = self._need(self.qa, "qa_data")[rng.randrange(len(self.qa))]
            questions = rng.sample(self.questions[first["context"]], len(self.questions[first["context"]]))
            if slot < len(questions):  # else: a context with fewer questions; this position draws its own
                return self._qa(stage, questions[slot], rng)
            rng = random.Random(f"{seed}-{stage_index}-{position}-own")
        return self._qa(stage, self._need(self.qa, "qa_data")[rng.randrange(len(self.qa))], rng)

    def _qa(self, stage: StageConfig, record: dict, rng: random.Random) -> Example:
        return stage_qa_example(self.model, stage, record, self.qa_pool, rng)

    @staticmethod
    def _need(items: list, what: str) -> list:
        if not items:
            raise ConfigError(f"this stage needs training data: `{what}` is empty")
        return items
