"""Restoration: how much of a passage the decoder rebuilds from its latents, overall and per token
class, always beside its control (another passage's latents: what the decoder gets from its prior)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from lclm_rag.prompt import restoration_message

TOKEN_CLASSES = ("all", "digit", "capitalised")


def token_classes(tokenizer, text: str) -> list[set[str]]:
    """The classes of each token of ``text`` (decoder ids, no special tokens), plus EOS (``all`` only).

    ``digit``: the token holds a digit; ``capitalised``: the token belongs to a word that starts
    with an upper-case letter (names, places, sentence starts).
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    words = [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+", text)]
    classes = []
    for start, end in enc["offset_mapping"]:
        piece = text[start:end]
        found = {"all"}
        if any(ch.isdigit() for ch in piece):
            found.add("digit")
        word = next((w for a, b, w in words if a <= start < b or (start < a < end)), "")
        if word[:1].isupper():
            found.add("capitalised")
        classes.append(found)
    return classes + [{"all"}]


@torch.no_grad()
def restoration_breakdown(model, passages: Sequence[str], control: bool = False) -> dict[str, dict]:
    """Restoration accuracy per token class (``TOKEN_CLASSES``): where the latents lose information.

    Teacher-forced next-token accuracy of rebuilding each passage (and its EOS) from its latents.
    ``control=True`` feeds every passage the latents of another passage of the batch: what the
    decoder gets right from its own prior, the number the real score must beat. Returns
    ``{class: {"correct", "total", "accuracy"}}``.
    """
    latents = model.compressor.encode_ids(model.compressor.tokenize(passages))
    if control:
        latents = latents[1:] + latents[:1]
    _, hits = model.teacher_forced([restoration_message()] * len(passages), [[z] for z in latents], list(passages), per_token=True)
    counts = {c: [0, 0] for c in TOKEN_CLASSES}
    for passage, row in zip(passages, hits, strict=True):
        classes = token_classes(model.decoder.tokenizer, passage)
        if len(classes) != len(row):
            raise RuntimeError(f"token classes ({len(classes)}) and restored tokens ({len(row)}) disagree")
        for found, hit in zip(classes, row.tolist()):
            for c in found:
                counts[c][0] += int(hit)
                counts[c][1] += 1
    return {c: {"correct": k, "total": n, "accuracy": k / n if n else float("nan")} for c, (k, n) in counts.items()}


def restoration_accuracy(model, passages: Sequence[str], control: bool = False) -> float:
    """Restoration accuracy over all tokens (see ``restoration_breakdown``)."""
    return restoration_breakdown(model, passages, control)["all"]["accuracy"]
