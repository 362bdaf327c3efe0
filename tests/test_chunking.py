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
