"""A bundle of files cut into checksummed parts, carried in several transfers of limited size.

``write_parts`` streams a tar of the given members into parts of at most ``part_bytes`` and groups
them into transfers ("calls") of at most ``call_bytes``: ``DIR/call1/``, ``DIR/call2/``, ... each
with the whole manifest (every part's size and sha256, the bundle's sha256). On the other machine
``receive`` copies one call's parts into a staging directory, checking each against the manifest
(a damaged part is refused by name), and once every call's parts are there puts the bundle back
together and extracts it into ``STAGE/files``. Receiving is idempotent: a call received twice, or
after the bundle was assembled, changes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Iterable
from pathlib import Path

from lclm_rag.errors import LclmRagError

MIB = 1 << 20
MANIFEST = "manifest.json"
FORMAT = "lclm-rag-parts"
READY = "READY"
_CHUNK = 4 * MIB


class TransferError(LclmRagError):
    """A carried part is missing or damaged, or a staging directory is incomplete."""


class _PartWriter(io.RawIOBase):
    """A write-only stream that cuts what it is given into files of at most ``part_bytes``."""

    def __init__(self, directory: Path, part_bytes: int, stem: str | None = None):
        self.directory, self.part_bytes, self.stem = directory, part_bytes, stem
        self.parts: list[dict] = []
        self.total = hashlib.sha256()
        self._fh = None
        self._hash = None
        self._size = 0

    def writable(self) -> bool:
        return True

    def _finish_part(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self.parts[-1].update(size=self._size, sha256=self._hash.hexdigest())
            self._fh = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            if self._fh is None or self._size >= self.part_bytes:
                self._finish_part()
                name = f"{self.stem}.{len(self.parts)}" if self.stem else f"part-{len(self.parts):03d}"
                self.parts.append({"name": name})
                self._fh, self._hash, self._size = open(self.directory / name, "wb"), hashlib.sha256(), 0
            piece = view[written:written + self.part_bytes - self._size]
            self._fh.write(piece)
            self._hash.update(piece)
            self.total.update(piece)
            self._size += len(piece)
            written += len(piece)
        return written

    def close(self) -> None:
        self._finish_part()
        super().close()


def _add(tar: tarfile.TarFile, arcname: str, source: Path | bytes) -> None:
    if isinstance(source, bytes):
        info = tarfile.TarInfo(arcname)
        info.size, info.mode = len(source), 0o644
        tar.addfile(info, io.BytesIO(source))
        return
    tar.add(str(source), arcname=arcname, filter=lambda t: None if "__pycache__" in t.name else t)


def plan_calls(parts: list[dict], call_bytes: int) -> int:
    """Give each part its call (in order, as many as fit in ``call_bytes``); returns the number of calls."""
    call, used = 1, 0
    for part in parts:
        if used and used + part["size"] > call_bytes:
            call, used = call + 1, 0
        part["call"], used = call, used + part["size"]
    return call


def write_parts(directory: str | Path, members: Iterable[tuple[str, Path | bytes]], part_bytes: int, call_bytes: int,
                extra: dict | None = None) -> dict:
    """Write ``members`` ((name in the bundle, file, folder or bytes), in order) as parts grouped into
    calls under ``directory``; returns the manifest (also written into each call's folder)."""
    directory = Path(directory)
    part_bytes = max(1, min(part_bytes, call_bytes))
    for old in list(directory.glob("call*")) + [directory / ".writing"]:
        shutil.rmtree(old, ignore_errors=True)
    writing = directory / ".writing"
    writing.mkdir(parents=True)
    writer = _PartWriter(writing, part_bytes)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for arcname, source in members:
            _add(tar, arcname, source)
    writer.close()
    calls = plan_calls(writer.parts, call_bytes)
    digest = writer.total.hexdigest()
    key = hashlib.sha256((digest + json.dumps(extra or {}, sort_keys=True, default=str)).encode()).hexdigest()[:16]
    manifest = {"format": FORMAT, "version": 1, "id": key, "bundle_sha256": digest,
                "bundle_bytes": sum(p["size"] for p in writer.parts), "calls": calls, "parts": writer.parts, **(extra or {})}
    for call in range(1, calls + 1):
        folder = directory / f"call{call}"
        folder.mkdir()
        for part in writer.parts:
            if part["call"] == call:
                (writing / part["name"]).rename(folder / part["name"])
        (folder / MANIFEST).write_text(json.dumps({**manifest, "this_call": call}, indent=1) + "\n")
    writing.rmdir()
    return manifest


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    path = path / MANIFEST if path.is_dir() else path
    if not path.is_file():
        raise TransferError(f"{path} does not exist: give the folder of one call as `pack` wrote it (DIR/callN)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise TransferError(f"{path} is not valid JSON ({exc}): the carried folder is damaged; pack again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TransferError(f"{path} is not a manifest written by `pack`")
    return manifest


def _copy_checked(source: Path, dest: Path, part: dict) -> None:
    digest, partial = hashlib.sha256(), dest.with_name(dest.name + ".partial")
    with open(source, "rb") as src, open(partial, "wb") as out:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != part["sha256"] or partial.stat().st_size != part["size"]:
        partial.unlink()
        raise TransferError(f"{source} (call {part['call']}) is damaged: sha256 {digest.hexdigest()[:16]}..., "
                            f"{source.stat().st_size} bytes, where the manifest says {part['sha256'][:16]}..., "
                            f"{part['size']} bytes. Nothing of it was kept: carry that call's folder again, or pack again")
    partial.rename(dest)


def missing_calls(stage: str | Path) -> list[int]:
    """The calls whose parts the staging directory still lacks (none once it is assembled)."""
    stage = Path(stage)
    if (stage / READY).is_file():
        return []
    if not (stage / MANIFEST).is_file():
        raise TransferError(f"{stage} holds no received parts: run `receive` for each call first")
    manifest = read_manifest(stage)
    return sorted({p["call"] for p in manifest["parts"] if not (stage / "parts" / p["name"]).is_file()})


class _Joined(io.RawIOBase):
    """The parts read back as one stream, hashed as they go."""

    def __init__(self, paths: list[Path]):
        self.paths, self.index, self.fh, self.digest = list(paths), 0, None, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.index < len(self.paths):
            if self.fh is None:
                self.fh = open(self.paths[self.index], "rb")
            n = self.fh.readinto(buffer)
            if n:
                self.digest.update(memoryview(buffer)[:n])
                return n
            self.fh.close()
            self.fh, self.index = None, self.index + 1
        return 0


def _extract(paths: list[Path], dest: Path) -> str:
    """Extract the tar the files at ``paths`` make when joined into ``dest``; returns the joined bytes' sha256."""
    joined = _Joined(paths)
    with tarfile.open(fileobj=io.BufferedReader(joined, _CHUNK), mode="r|") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - Python before 3.11.4
            tar.extractall(dest)
    while joined.readinto(bytearray(_CHUNK)):  # the tar's zero padding after its last member
        pass
    return joined.digest.hexdigest()


def _assemble(stage: Path, manifest: dict) -> None:
    files, partial = stage / "files", stage / "files.partial"
    shutil.rmtree(partial, ignore_errors=True)
    if _extract([stage / "parts" / p["name"] for p in manifest["parts"]], partial) != manifest["bundle_sha256"]:
        raise TransferError(f"the parts in {stage / 'parts'} do not make the bundle the manifest names: pack again")
    shutil.rmtree(files, ignore_errors=True)
    partial.rename(files)
    shutil.rmtree(stage / "parts")
    (stage / READY).write_text(manifest["id"] + "\n")


def receive(carried: str | Path, stage: str | Path) -> dict:
    """Copy one call's parts into ``stage`` (checked); assemble the bundle once all are there.

    Returns ``{"id", "call", "calls", "missing_calls", "complete"}``. A staging directory that
    holds another bundle's parts is emptied first.
    """
    carried, stage = Path(carried), Path(stage)
    manifest = read_manifest(carried)
    stage.mkdir(parents=True, exist_ok=True)
    if (stage / MANIFEST).is_file() and read_manifest(stage)["id"] != manifest["id"]:
        for child in stage.iterdir():  # another pack's stage (a warm machine reused): start afresh
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    if not (stage / MANIFEST).is_file():
        (stage / MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items() if k != "this_call"}, indent=1) + "\n")
    status = {"id": manifest["id"], "call": manifest.get("this_call"), "calls": manifest["calls"]}
    if (stage / READY).is_file():
        return {**status, "missing_calls": [], "complete": True}
    (stage / "parts").mkdir(exist_ok=True)
    for part in manifest["parts"]:
        source, dest = carried / part["name"], stage / "parts" / part["name"]
        if dest.is_file():
            continue
        if source.is_file():
            _copy_checked(source, dest, part)
        elif part["call"] == manifest.get("this_call"):
            raise TransferError(f"{carried} lacks {part['name']}, which belongs to call {part['call']}: carry the folder whole")
    missing = missing_calls(stage)
    if not missing:
        _assemble(stage, manifest)
    return {**status, "missing_calls": missing, "complete": not missing}


def write_pieces(directory: str | Path, name: str, source: Path, piece_bytes: int) -> list[dict]:
    """``source`` (a file or folder) as the tar ``directory/name``, cut into ``name.0``, ``name.1``, ...
    where it is over ``piece_bytes``; returns each piece's name, size and sha256, for ``read_pieces``."""
    directory = Path(directory)
    writer = _PartWriter(directory, piece_bytes, stem=name)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, Path(source).name, Path(source))
    writer.close()
    if len(writer.parts) == 1:  # one piece: the plain tar
        (directory / writer.parts[0]["name"]).rename(directory / name)
        writer.parts[0]["name"] = name
    return writer.parts


def read_pieces(directory: str | Path, pieces: list[dict], dest: str | Path) -> None:
    """Check each piece ``write_pieces`` listed, then extract their tar into ``dest``."""
    directory = Path(directory)
    for piece in pieces:
        path = directory / piece["name"]
        digest = hashlib.sha256()
        if path.is_file():
            with open(path, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    digest.update(chunk)
        if not path.is_file() or path.stat().st_size != piece["size"] or digest.hexdigest() != piece["sha256"]:
            raise TransferError(f"{path} is missing or damaged (its size or sha256 is not what was written)")
    _extract([directory / piece["name"] for piece in pieces], Path(dest))
