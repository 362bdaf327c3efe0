"""What the decoder is asked: the user turns of every task, with one slot per passage.

A slot is a placeholder (``slot_marker``) inside a user message; the decoder renders its chat
template around the message and puts each passage's latents (between two boundary embeddings)
or raw text where its marker is. Training, evaluation and serving all build prompts here, so a
model is always asked the way it was trained.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lclm_rag.errors import InputError

BOUNDARY_POSITIONS = 2  # one boundary embedding before and one after each passage's latents (the default)
RESTORE_PROMPT = "Repeat the text above word for word."
CONTINUE_PROMPT = "Continue the text above."
CONTENT_FREE_QUESTION = "N/A"  # asked beside the real question to calibrate its attention (arXiv 2410.02642)

Slot = torch.Tensor | str  # latents (n, encoder_hidden) or the passage's raw text
_SENTINEL = "\u2063SLOT{}\u2063"
SENTINEL_RE = re.compile("\u2063SLOT(\\d+)\u2063")


def slot_marker(index: int) -> str:
    """Placeholder for passage ``index`` inside a user message given to ``LatentDecoder.segments``."""
    return _SENTINEL.format(index)


def without_slot_markers(text: str) -> str:
    """``text`` with the slot markers' separator (U+2063, invisible) removed: user text that looks like
    a marker stays text instead of being cut out of the prompt as a passage's place."""
    return text.replace("\u2063", "")


def latent_positions(num_latents: int, boundaries: int = BOUNDARY_POSITIONS) -> int:
    """Prompt positions a passage of ``num_latents`` latents takes (latents and their boundaries)."""
    return num_latents + boundaries


@dataclass
class Segment:
    """A run of the prompt: token ids, or one passage's latents (encoder side)."""

    token_ids: list[int] | None = None
    latents: torch.Tensor | None = None
    boundaries: int = BOUNDARY_POSITIONS  # boundary embeddings around the latents (the decoder's config says)

    @property
    def positions(self) -> int:
        return len(self.token_ids) if self.token_ids is not None else latent_positions(self.latents.shape[0], self.boundaries)


def qa_message(instruction: str, question: str, num_slots: int, template: str = "lclm-rag",
               notes: Sequence[str] | None = None) -> str:
    """The user turn for a question over ``num_slots`` passages (slot markers inline).

    ``template``: ``lclm-rag`` (ours: instruction, ``Context:`` with ``[i]`` per passage, then
    ``Question:``), ``lclm`` (LCLM's documented prompt: each passage between its memory boundaries,
    then the question), ``squid`` (Squid's published inference prompt: the passages' memory, then
    the question), ``arc`` (ARC-Encoder's QA prompt: ``Document: `` with the passages side by side,
    then ``Question: ...`` and ``Answer:``) or a text with ``{context}`` (the passages, one ``[i]``
    line each) and ``{question}`` fields. ``notes``: text put right after each passage's slot (a passage's sidecar
    of exact strings, `lclm_rag.sidecar`), one per slot, empty for none.
    """
    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty")
    question = without_slot_markers(question.strip())  # a question cannot point at a passage slot
    notes = [without_slot_markers(n) for n in notes] if notes is not None else [""] * num_slots
    if len(notes) != num_slots:
        raise InputError(f"{len(notes)} notes for {num_slots} passages")
    slots = [slot_marker(i) + (f" {note}" if note else "") for i, note in enumerate(notes)]
    if template == "lclm":
        return "".join(slots) + ("\n" if num_slots else "") + question
    if template == "squid":
        return "".join(slots) + question
    if template == "arc":
        return ("Document: " + "".join(slots) if num_slots else "") + f"\nQuestion: {question}\nAnswer:"
    if template != "lclm-rag":
        context = "\n".join(f"[{i + 1}] {slot}" for i, slot in enumerate(slots))
        return template.format(context=context, question=question)
    parts = [instruction, ""]
    if num_slots:
        parts.append("Context:")
        parts.extend(f"[{i + 1}] {slot}" for i, slot in enumerate(slots))
        parts.append("")
    parts.append(f"Question: {question}")
    return "\n".join(parts)


def render_prompt(tokenizer, user_message: str, form: str = "chat", system_message: str | None = None) -> str:
    """The whole prompt's text around a user turn: the decoder's chat template (with the generation
    prompt and any system turn) for ``chat``; the turn as plain text for ``text`` (Squid); BOS and
    then the text for ``bos-text`` (the base decoders ARC-Encoder is read by)."""
    if form != "chat":
        bos = tokenizer.bos_token if form == "bos-text" else None
        return (bos or "") + (system_message + "\n\n" if system_message else "") + user_message
    messages = [{"role": "user", "content": user_message}]
    if system_message is not None:
        messages.insert(0, {"role": "system", "content": system_message})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def restoration_message(note: str = "") -> str:
    """Rebuild the passage in slot 0 word for word (restoration training and its evaluation);
    ``note``: its sidecar, after the latents."""
    return f"{slot_marker(0)}{' ' + note if note else ''}\n\n{RESTORE_PROMPT}"


def continuation_message() -> str:
    """Continue the passage in slot 0 (continuation training)."""
    return f"{slot_marker(0)}\n\n{CONTINUE_PROMPT}"
