"""A folder written as checksummed pieces comes back whole, and a damaged piece is refused by name."""

import os

import pytest

from lclm_rag.training.transfer import TransferError, read_pieces, write_pieces


def _folder(root, size):
    folder = root / "candidate"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "weights.bin").write_bytes(os.urandom(size))
    (folder / "state.json").write_text('{"global_step": 3}\n')
    return folder


def test_a_folder_over_the_limit_comes_back_from_its_pieces(tmp_path):
    source, out = _folder(tmp_path / "here", 50_000), tmp_path / "out"
    out.mkdir()
    pieces = write_pieces(out, "candidate.tar", source, piece_bytes=16_384)
    assert [p["name"] for p in pieces] == [f"candidate.tar.{i}" for i in range(len(pieces))] and len(pieces) >= 4
    assert all((out / p["name"]).stat().st_size == p["size"] <= 16_384 for p in pieces)

    read_pieces(out, pieces, tmp_path / "back")
    back = tmp_path / "back" / "candidate"
    assert (back / "model" / "weights.bin").read_bytes() == (source / "model" / "weights.bin").read_bytes()
    assert (back / "state.json").read_text() == '{"global_step": 3}\n'


def test_one_piece_is_the_plain_tar_and_a_damaged_or_missing_piece_is_refused(tmp_path):
    source, out = _folder(tmp_path / "here", 2_000), tmp_path / "out"
    out.mkdir()
    pieces = write_pieces(out, "candidate.tar", source, piece_bytes=1 << 20)
    assert [p["name"] for p in pieces] == ["candidate.tar"]

    data = bytearray((out / "candidate.tar").read_bytes())
    data[700] ^= 0xFF
    (out / "candidate.tar").write_bytes(bytes(data))
    with pytest.raises(TransferError, match="candidate.tar is missing or damaged"):
        read_pieces(out, pieces, tmp_path / "back")
    (out / "candidate.tar").unlink()
    with pytest.raises(TransferError, match="candidate.tar is missing or damaged"):
        read_pieces(out, pieces, tmp_path / "back")
    assert not (tmp_path / "back").exists()
