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


def chunk_text(text: str, tokenizer, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, overlap: int = DEFAULT_OVERLAP) -> list[Chunk]:
    """Split ``text`` into chunks of at most ``chunk_tokens`` tokens, ``overlap`` tokens shared.

    Cuts fall on token boundaries (via the fast tokenizer's offset mapping), and the chunk's
    text is stripped of surrounding whitespace: ``text[start_char:end_char] == chunk.text``.
    """
    if chunk_tokens <= 0:
        raise ConfigError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if not 0 <= overlap < chunk_tokens:
        raise ConfigError(f"overlap must be in [0, chunk_tokens), got {overlap} with chunk_tokens={chunk_tokens}")
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
