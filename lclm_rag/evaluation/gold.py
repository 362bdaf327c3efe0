"""Reading only: QA with each question's gold passage, as text, as latents, or another passage's latents."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

from lclm_rag.data import sample_records
from lclm_rag.evaluation.metrics import QAScores, score_predictions
from lclm_rag.prompt import latent_positions
from lclm_rag.sidecar import fit_key_terms, key_terms, sidecar_text
from lclm_rag.store.quantize import as_stored

GOLD_MODES = ("none", "text", "text-base", "latent", "latent-control", "key-terms", "lead", "latent+key-terms",
              "latent+key-terms-control", "latent+lead", "latent+lead-control", "key-terms@sidecar", "lead@sidecar")
# text cut to the positions the passage's latents take (or, @sidecar, its latents and their sidecar)
EQUAL_POSITION_MODES = ("key-terms", "lead", "key-terms@sidecar", "lead@sidecar")
SIDECAR_TERMS = 12  # key terms after the latents in the latent+key-terms modes, for a checkpoint trained without
#                     a sidecar (one trained with it reads its own ``sidecar_terms``)
LEAD_PREFIX = "Opening: "  # the latent+lead modes' note: the passage's first tokens after its latents


def _lead(decoder, text: str, positions: int) -> str:
    """The passage's first ``positions`` decoder tokens, as text."""
    return decoder.tokenizer.decode(decoder.text_ids(text)[:positions])


def _sidecar(model, text: str) -> str:
    """The passage's key-term sidecar as the latent+key-terms modes place it after its latents."""
    return sidecar_text(key_terms(text, model.config.sidecar_terms or SIDECAR_TERMS))


def _sidecar_positions(model, text: str) -> int:
    return len(model.decoder.text_ids(" " + _sidecar(model, text)))


def _lead_note(model, text: str) -> str:
    """The passage's opening as the note after its latents, as many positions as its key-term sidecar
    would take: the latents then hold what the text leaves out, at the same cost as the sidecar."""
    dec = model.decoder
    return LEAD_PREFIX + _lead(dec, text, max(1, _sidecar_positions(model, text) - len(dec.text_ids(" " + LEAD_PREFIX))))


def _equal_position_text(model, mode: str, text: str, latents: int) -> str:
    dec = model.decoder
    positions = latent_positions(latents, model.config.boundary_positions)  # one boundary (Squid, ARC) or two
    if mode.endswith("@sidecar"):
        positions += _sidecar_positions(model, text)
    if mode.startswith("lead"):
        return _lead(dec, text, positions)
    return fit_key_terms(text, positions, lambda t: len(dec.text_ids(t))) or _lead(dec, text, positions)


def evaluate_gold_passage(model, records: Sequence[dict], mode: str, max_new_tokens: int = 32, batch_size: int = 8,
                          latent_dtype: str | None = None) -> tuple[QAScores, list[str]]:
    """QA with the gold passage only (reading, not retrieval). Modes:

    ``none`` no context; ``text`` full passage as text; ``text-base`` the same with the decoder's
    adapters disabled (the base decoder); ``latent`` the passage compressed; ``latent-control``
    the latents of *another* question's passage (what the decoder answers from its prior).
    ``latent_dtype`` ("float16", "uint8"): latents as a collection of that type gives them back
    (None: as the encoder made them). Query-independent text at the latents' own positions, read by
    the same decoder, is the bar latents must clear: ``key-terms`` (the passage's names and numbers,
    `lclm_rag.sidecar`; its lead where it has none) and ``lead`` (its first tokens); ``@sidecar``
    cuts them to the positions of the latents with their sidecar instead.
    ``latent+key-terms``: the latents with their sidecar of key terms after them;
    ``latent+key-terms-control``: another passage's latents with this passage's key terms.
    ``latent+lead`` (``-control``): the same with the passage's opening text as the note, cut to the
    positions its key terms would take (so ``lead@sidecar`` is its bar too).
    Returns the scores (with the passage's mean prompt positions) and the predictions.
    """
    if mode not in GOLD_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {GOLD_MODES}")
    base = model.decoder.base() if mode == "text-base" else contextlib.nullcontext()
    preds: list[str] = []
    positions: list[int] = []
    start = time.perf_counter()
    with base:
        for b in range(0, len(records), batch_size):
            batch = records[b : b + batch_size]
            questions = [r["question"] for r in batch]
            notes = None
            if mode == "none":
                contexts = [[] for _ in batch]
            elif mode in ("text", "text-base"):
                contexts = [[r["context"]] for r in batch]
            else:
                latents = model.compress([r["context"] for r in batch])
                if mode in EQUAL_POSITION_MODES:
                    contexts = [[_equal_position_text(model, mode, r["context"], len(lat))]
                                for r, lat in zip(batch, latents)]
                else:
                    if mode.endswith("-control"):
                        latents = latents[1:] + latents[:1] if len(latents) > 1 else model.compress([records[(b + len(batch)) % len(records)]["context"]])
                    if latent_dtype is not None:
                        latents = [as_stored(lat, latent_dtype) for lat in latents]
                    contexts = [[lat] for lat in latents]
                    if "key-terms" in mode:
                        notes = [[_sidecar(model, r["context"])] for r in batch]
                    elif "lead" in mode:
                        notes = [[_lead_note(model, r["context"])] for r in batch]
            prompts = [model.decoder.segments(model.decoder.qa_user_message(q, len(c), n), c)
                       for q, c, n in zip(questions, contexts, notes or [None] * len(batch))]
            positions.extend(_passage_positions(model, prompts, q) for prompts, q in zip(prompts, questions))
            preds.extend(model.decoder.generate_from_segments(prompts, max_new_tokens=max_new_tokens))
    scores = score_predictions(mode, preds, records, time.perf_counter() - start)
    scores.passage_positions = sum(positions) / max(len(positions), 1)
    return scores, preds


def _passage_positions(model, segments, question: str) -> int:
    """Prompt positions beyond those of the same question asked with no passage: what the passage costs."""
    empty = model.decoder.segments(model.decoder.qa_user_message(question, 0), [])
    return sum(s.positions for s in segments) - sum(s.positions for s in empty)


def run_gold_eval(model, data: str | Path, modes: Sequence[str], limit: int, seed: int = 0, max_new_tokens: int = 32,
                  output: str | Path | None = None, latent_dtype: str | None = None) -> dict:
    """Every mode on the same fixed sample of questions; optional JSON output with predictions."""
    records = sample_records(data, limit, seed=seed)
    result = {"data": str(data), "n": len(records), "seed": seed, "max_new_tokens": max_new_tokens,
              "fingerprint": model.fingerprint(), "ratio": model.config.ratio, "latent_dtype": latent_dtype,
              "scores": [], "predictions": {}}
    for mode in modes:
        scores, preds = evaluate_gold_passage(model, records, mode, max_new_tokens=max_new_tokens, latent_dtype=latent_dtype)
        result["scores"].append(scores.as_dict())
        result["predictions"][mode] = preds
        if output:  # after every mode: an interrupted run keeps what it measured
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(result, indent=2))
    return result
