"""Token-based chunking with the encoder's tokenizer (shared by ingestion and training)."""

from __future__ import annotations

from dataclasses import dataclass

from lclm_rag.errors import ConfigError

DEFAULT_CHUNK_TOKENS = 128  # passage length at ingestion (encoder tokens)
DEFAULT_OVERLAP = 16  # tokens shared by consecutive passages at ingestion


@dataclass(frozen=True)
class Chunk:
    text: str
    index: int  # position of the chunk in its document
    start_char: int  # character span of the chunk in the document text
    end_char: int
    num_tokens: int


BLOCK_CHARS = 1_000_000  # a longer text is tokenised block by block (cut at whitespace): bounded memory


def check_chunking(chunk_tokens: int, overlap: int) -> None:
    """Refuse settings no text can be chunked with: called before a collection is created, so a
    mistake leaves nothing behind."""
    if chunk_tokens <= 0:
        raise ConfigError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if not 0 <= overlap < chunk_tokens:
        raise ConfigError(f"overlap must be in [0, chunk_tokens), got {overlap} with chunk_tokens={chunk_tokens}")


def chunk_text(text: str, tokenizer, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, overlap: int = DEFAULT_OVERLAP) -> list[Chunk]:
    """Split ``text`` into chunks of at most ``chunk_tokens`` tokens, ``overlap`` tokens shared.

    Cuts fall on token boundaries (via the fast tokenizer's offset mapping), and the chunk's
    text is stripped of surrounding whitespace: ``text[start_char:end_char] == chunk.text``.
    A text longer than ``BLOCK_CHARS`` is cut at whitespace into blocks chunked one after the
    other (no overlap across a block boundary), so memory stays bounded for any file size.
    """
    check_chunking(chunk_tokens, overlap)
    chunks: list[Chunk] = []
    start = 0
    while start < len(text):
        end = len(text) if len(text) - start <= BLOCK_CHARS else _cut(text, start + BLOCK_CHARS)
        for c in _chunk_block(text[start:end], tokenizer, chunk_tokens, overlap):
            chunks.append(Chunk(c.text, len(chunks), c.start_char + start, c.end_char + start, c.num_tokens))
        start = end
    return chunks


def _cut(text: str, near: int) -> int:
    """A whitespace position at or before ``near`` (or ``near`` itself in a text without any)."""
    lo = max(0, near - 10_000)
    space = max(text.rfind(" ", lo, near), text.rfind("\n", lo, near))
    return space + 1 if space > 0 else near


def _chunk_block(text: str, tokenizer, chunk_tokens: int, overlap: int) -> list[Chunk]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    chunks: list[Chunk] = []
    step = chunk_tokens - overlap
    start = 0
    while start < len(offsets):
        end = min(start + chunk_tokens, len(offsets))
        s_char = offsets[start][0]
        e_char = offsets[end][0] if end < len(offsets) else len(text)
        piece = text[s_char:e_char]
        stripped = piece.strip()
        if stripped:
            lead = len(piece) - len(piece.lstrip())
            chunks.append(Chunk(stripped, len(chunks), s_char + lead, s_char + lead + len(stripped), end - start))
        if end == len(offsets):
            break
        start += step
    return chunks
