"""A passage's exact strings: its names and numbers, as short text beside (or instead of) its latents.

Mean-pooled latents garble what answers hinge on: names come back exact a fraction as often as
from text, numbers a half (LCLM's agent expands a passage before copying any ID for the same
reason). The *key terms* of a passage are its capitalised phrases and numbers in passage order,
without repeats; as text they cost few positions. They serve twice: as an equal-position baseline
the latents must beat (``key-terms`` in the gold evaluation) and as the *sidecar* placed after a
passage's latents (``Key terms: Gustave Eiffel; 1889; ...``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

SIDECAR_PREFIX = "Key terms: "
SEPARATOR = "; "
# a date (October 16, 2012), a number (1,889 / 3.5 / 42% / 1990s) or a run of capitalised words, joined by a few lowercase links
_NUMBER = r"\d[\d,.]*\d%?s?|\d%?s?"
_WORD = r"[A-Z][\w'’\-]*"
_LINK = r"(?:of|de|da|del|der|van|von|la|le|the|du)"
_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_DATE = rf"{_MONTH}\s+\d{{1,2}}(?:,\s*\d{{4}})?|\d{{1,2}}\s+{_MONTH}(?:\s+\d{{4}})?|{_MONTH}\s+\d{{4}}"
_PHRASE = rf"{_WORD}(?:[ \t]+(?:{_LINK}[ \t]+)?{_WORD})*"  # within a line: a heading never runs into its text
_TERM = re.compile(rf"(?<![\w])(?:{_DATE}|{_NUMBER}|{_PHRASE})")
# capitalised only because a sentence starts with them
_FUNCTION_WORDS = frozenset("""a an the this that these those it its it's he she they we i you his her their our
in on at by for from with as of to and or but if when while after before during since until although though however
there here what which who whom whose where why how some many most all each every both one another other such no not
also then thus so yet""".split())


def key_terms(text: str, limit: int | None = 12) -> list[str]:
    """Capitalised phrases and numbers of ``text`` in order of first appearance, at most ``limit``."""
    terms: list[str] = []
    seen: set[str] = set()
    for match in _TERM.finditer(text):
        words = match.group(0).split()
        while words and words[0].lower() in _FUNCTION_WORDS:  # "The Eiffel Tower" -> "Eiffel Tower"
            words = words[1:]
        term = " ".join(words).strip(".,;:'’-")
        if not term or term.lower() in seen:
            continue
        seen.add(term.lower())
        terms.append(term)
        if limit is not None and len(terms) >= limit:
            break
    return terms


def sidecar_text(terms: list[str]) -> str:
    """The text put after a passage's latents (empty when there are no terms)."""
    return SIDECAR_PREFIX + SEPARATOR.join(terms) if terms else ""


def passage_sidecar(text: str, payload: dict | None, count: int) -> str:
    """A passage's sidecar of ``count`` terms: those ingestion stored in its payload (``key_terms``),
    else its own text's (a collection written before the model read a sidecar)."""
    stored = (payload or {}).get("key_terms")
    terms = stored if isinstance(stored, list) and all(isinstance(t, str) for t in stored) else key_terms(text, count)
    return sidecar_text(terms[:count])


def fit_key_terms(text: str, positions: int, count: Callable[[str], int]) -> str:
    """The longest ``Key terms: ...`` text of ``text``'s terms (in order) that ``count`` says fits ``positions``."""
    terms = key_terms(text, limit=None)
    best = ""
    for n in range(1, len(terms) + 1):
        candidate = sidecar_text(terms[:n])
        if count(candidate) > positions:
            break
        best = candidate
    return best
