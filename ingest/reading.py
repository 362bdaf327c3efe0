"""Reading files into documents: which files a path holds, what each one's documents are, and
why a file cannot be ingested (an ``InputError`` naming the reason; the ingestor reports it as
that one source's failure and goes on with the others)."""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lclm_rag.errors import InputError

TEXT_EXTENSIONS = {".txt", ".md", ".markdown", ".html", ".htm", ".rst", ".csv", ".xml"}
RECORD_EXTENSIONS = {".jsonl", ".json"}


@dataclass
class SourceDocument:
    doc_id: str  # stable identity: resolved absolute path, or path#record-id for JSON records
    text: str
    source: str
    metadata: dict = field(default_factory=dict)
    node_id: str | None = None  # set: store the text as one passage under this LlamaIndex node id


def doc_key(path: Path) -> str:
    """A file's document id: its resolved absolute path, whatever directory the ingest ran from.
    ``os.path.realpath`` never raises, so a symbolic-link loop still gets a key to report it under."""
    return Path(os.path.realpath(path)).as_posix()


def legacy_doc_key(path: Path) -> str:
    """The id collections written before ids were absolute used: relative to the working directory
    when the file was below it. Documents already stored under it keep it (no re-ingestion)."""
    rel = os.path.relpath(os.path.realpath(path))
    return Path(rel).as_posix() if not rel.startswith("..") else doc_key(path)


def iter_files(paths: Sequence[str | Path], unreadable: list[tuple[Path, str]],
               repeated: list[tuple[Path, str]] | None = None) -> Iterator[Path]:
    """Files under ``paths`` (hidden ones skipped), in a stable order. A directory that cannot be
    listed goes to ``unreadable``; symbolic links to directories are followed, and one that leads
    to a directory already walked (a loop, or a second way to the same files) goes to ``repeated``
    instead of being walked again: nothing is skipped in silence."""
    for p in paths:
        p = Path(p)
        if not p.is_dir():
            yield p  # a missing path or a non-regular file is reported as a failed source by read_file
            continue
        found: list[Path] = []
        top = os.stat(p)
        walked = {(top.st_dev, top.st_ino)}
        for root, dirs, files in os.walk(p, followlinks=True,
                                         onerror=lambda exc: unreadable.append((Path(exc.filename), exc.strerror or str(exc)))):
            keep = []
            # real directories claim their place before links to them, so a link is the one reported
            for d in sorted((d for d in dirs if not d.startswith(".")), key=lambda d: (os.path.islink(os.path.join(root, d)), d)):
                sub = os.path.join(root, d)
                try:
                    st = os.stat(sub)
                except OSError as exc:
                    unreadable.append((Path(sub), exc.strerror or str(exc)))
                    continue
                if (st.st_dev, st.st_ino) in walked:
                    if os.path.islink(sub) and repeated is not None:
                        repeated.append((Path(sub), f"symbolic link to a directory already read ({os.path.realpath(sub)})"))
                    continue
                walked.add((st.st_dev, st.st_ino))
                keep.append(d)
            dirs[:] = sorted(keep)
            found.extend(Path(root) / f for f in files if not f.startswith("."))
        yield from sorted(found)


_CONTROL = re.compile("[\x01-\x08\x0b\x0e-\x1f\x7f]")


def clean_text(text: str) -> str:
    """Control characters (other than tab, newlines and form feed) become spaces: same length, so
    character spans still point into the file."""
    return _CONTROL.sub(" ", text)


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def read_bytes(path: Path) -> bytes:
    """A regular file's bytes. Opened without blocking and checked before reading, so a FIFO or a
    device (which a plain read would wait on forever, or read without end) is refused at once."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InputError("unreadable: broken symbolic link" if os.path.islink(path) else "no such file") from None
    except OSError as exc:
        raise InputError(f"unreadable: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a file")
            raise InputError(f"not a regular file ({kind}): skipped")
        try:
            return fh.read()
        except OSError as exc:
            raise InputError(f"unreadable: {exc.strerror or exc}") from exc


def read_file(path: Path, text_field: str = "text") -> list[SourceDocument]:
    """Documents of one file; raises InputError with the reason a file cannot be ingested."""
    raw = read_bytes(path)
    if not raw.strip():
        raise InputError("empty file")
    key = doc_key(path)
    ext = path.suffix.lower()
    if ext in RECORD_EXTENSIONS:
        return _read_records(raw, key, str(path), ext, text_field)
    if ext in TEXT_EXTENSIONS or ext == "":
        nul = raw.find(b"\x00")
        if nul >= 0:
            raise InputError(f"binary file (a NUL byte at byte {nul})")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"not UTF-8 text (byte {exc.start})") from exc
    try:
        from llama_index.core import SimpleDirectoryReader
    except ImportError as exc:
        raise InputError(f"reading {ext or 'these'} files needs LlamaIndex's readers: pip install 'lclm-rag[llama-index]'") from exc
    try:
        docs = SimpleDirectoryReader(input_files=[str(path)], errors="strict", raise_on_error=True).load_data()
    except Exception as exc:  # readers raise anything from ValueError to parser-specific errors
        raise InputError(f"no reader could read it ({type(exc).__name__}: {exc})") from exc
    text = clean_text("\n\n".join(d.text for d in docs if d.text and d.text.strip()))
    if not text.strip():
        raise InputError("no text extracted")
    meta = {k: v for k, v in (docs[0].metadata if docs else {}).items() if k in ("file_name", "file_type", "page_label")}
    return [SourceDocument(key, text, str(path), meta)]


def _read_records(raw: bytes, key: str, source: str, ext: str, text_field: str) -> list[SourceDocument]:
    kind = ext[1:].upper()
    try:
        content = raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not part of the JSON
        records = [json.loads(line) for line in content.splitlines() if line.strip()] if ext == ".jsonl" else json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"invalid {kind}: {exc}") from exc
    except RecursionError:
        raise InputError(f"invalid {kind}: nested too deeply to read") from None
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        raise InputError(f"a {kind} file holds an object or a list of objects, not {type(records).__name__} "
                         f"({json.dumps(records)[:40]})")
    docs = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
            raise InputError(f"record {i} has no string field {text_field!r}")
        text = rec[text_field]
        if not text.strip():
            continue
        nul = text.find("\x00")
        if nul >= 0:  # as a text file holding NUL is refused as binary
            raise InputError(f"record {i}: its text holds a NUL character (at character {nul})")
        rid = rec.get("id", i)
        meta = {k: v for k, v in rec.items() if k != text_field and isinstance(v, (str, int, float, bool))}
        docs.append(SourceDocument(f"{key}#{rid}", clean_text(text), source, meta))
    if not docs:
        raise InputError(f"no record has text in field {text_field!r}")
    return docs


def unstorable(doc: SourceDocument) -> str | None:
    """Why the store cannot hold this document (a name or text that is not valid Unicode, a
    number it has no type for), or None: checked before anything is written."""
    def bad_text(value: str) -> bool:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False

    if bad_text(doc.doc_id) or bad_text(doc.source):
        return f"its name {doc.source!r} is not valid UTF-8"
    if bad_text(doc.text):
        return f"document {doc.doc_id!r}: its text holds an unpaired surrogate (not valid Unicode)"
    for k, v in doc.metadata.items():
        if (isinstance(v, str) and bad_text(v)) or bad_text(str(k)):
            return f"document {doc.doc_id!r}: field {k!r} is not valid Unicode"
        if isinstance(v, float) and not math.isfinite(v):
            return f"document {doc.doc_id!r}: field {k!r} is {v}, which the store cannot hold"
        if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**63:
            return f"document {doc.doc_id!r}: field {k!r} is an integer beyond 64 bits, which the store cannot hold"
    return None
