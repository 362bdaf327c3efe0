import pytest

from lclm_rag.chunking import chunk_text
from lclm_rag.errors import ConfigError


def test_chunks_are_exact_spans_with_overlap(encoder_parts, passages):
    tok = encoder_parts[1]
    text = " ".join(passages) * 3
    chunks = chunk_text(text, tok, chunk_tokens=32, overlap=8)
    assert len(chunks) > 3 and [c.index for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert text[c.start_char:c.end_char] == c.text  # the span is the stored text, exactly
        assert c.num_tokens <= 32
    assert chunks[0].end_char > chunks[1].start_char  # overlap
    assert chunks[-1].end_char == len(text.rstrip())
    assert chunk_text("   ", tok) == []
    with pytest.raises(ConfigError, match="overlap"):
        chunk_text(text, tok, chunk_tokens=8, overlap=8)
    with pytest.raises(ConfigError, match="chunk_tokens"):
        chunk_text(text, tok, chunk_tokens=0)


def test_a_long_text_is_chunked_block_by_block_with_exact_spans(encoder_parts, passages, monkeypatch):
    import lclm_rag.chunking as chunking

    tok = encoder_parts[1]
    text = " ".join(passages) * 6
    whole = chunk_text(text, tok, chunk_tokens=32, overlap=0)
    monkeypatch.setattr(chunking, "BLOCK_CHARS", 700)  # many blocks
    blocks = chunk_text(text, tok, chunk_tokens=32, overlap=0)
    assert len(text) > 4 * 700 and [c.index for c in blocks] == list(range(len(blocks)))
    for c in blocks:
        assert text[c.start_char:c.end_char] == c.text and c.num_tokens <= 32
    for prev, nxt in zip(blocks, blocks[1:]):  # nothing lost: only whitespace between consecutive chunks
        assert prev.end_char <= nxt.start_char and not text[prev.end_char:nxt.start_char].strip()
    assert blocks[0].start_char == whole[0].start_char and blocks[-1].end_char == whole[-1].end_char == len(text.rstrip())
