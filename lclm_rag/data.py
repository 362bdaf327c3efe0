"""Training and evaluation records: JSON Lines files, or Hugging Face ``datasets`` where reachable.

Two record shapes are used throughout: corpus records ``{"text"}`` (restoration, continuation)
and QA records ``{"context", "question", "answers": [str, ...]}``. A data source is either the
path of a JSONL file already in that shape, or a dataset spec (a dict) that ``datasets`` loads —
a hub id, a local ``save_to_disk`` folder, or a builder such as ``"json"`` with ``data_files`` —
whose columns are renamed and whose SQuAD-style answers (``{"text": [...], ...}``) are flattened.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

from lclm_rag.errors import ConfigError, InputError

EVAL_ONLY_FILES = ("squad_dev.jsonl",)  # the project's held-out QA set: evaluation only


@dataclass
class DatasetSpec:
    dataset: str  # hub id ("rajpurkar/squad"), a save_to_disk folder, or a builder name ("json", "parquet")
    split: str = "train"  # which split to read
    name: str | None = None  # the dataset's configuration, if it has several
    data_files: Any = None  # files for a builder name (str, list or {split: files})
    columns: dict[str, str] = field(default_factory=dict)  # our field -> the dataset's column, e.g. {"text": "article"}
    limit: int | None = None  # read at most this many records

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"dataset spec has unknown keys {sorted(unknown)} (known: {sorted(known)})")
        if not isinstance(d.get("dataset"), str) or not d["dataset"].strip():
            raise ConfigError(f"a dataset spec needs `dataset` (a hub id, a local folder or a builder name), got {d!r}")
        return cls(**d)

    def describe(self) -> str:
        return f"{self.dataset}" + (f"/{self.name}" if self.name else "") + f"[{self.split}]"


DataSource = Union[str, DatasetSpec]


def parse_source(source: str | dict | DatasetSpec) -> DataSource:
    """A config entry as a JSONL path or a :class:`DatasetSpec`; refuses the evaluation-only files."""
    if isinstance(source, DatasetSpec):
        spec = source
    elif isinstance(source, dict):
        spec = DatasetSpec.from_dict(source)
    elif isinstance(source, (str, Path)):
        if Path(source).name in EVAL_ONLY_FILES:
            raise ConfigError(f"{Path(source).name} is for evaluation only: remove it from the training data")
        return str(source)
    else:
        raise ConfigError(f"a data source is a JSONL path or a dataset spec dict, got {type(source).__name__}: {source!r}")
    if "squad" in spec.dataset.lower() and spec.split.lower().startswith(("validation", "dev")):
        raise ConfigError(f"{spec.describe()} is SQuAD's dev set, which is for evaluation only")
    return spec


def load_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """The records of a JSON Lines file (blank lines skipped); a line that is not a JSON object is
    refused with its file and line number."""
    out = []
    with open(path, encoding="utf-8") as fh:
        try:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise InputError(f"{path}:{number}: not a JSON record ({exc})") from None
                if not isinstance(record, dict):
                    raise InputError(f"{path}:{number}: a record must be a JSON object, got {type(record).__name__}")
                out.append(record)
                if limit is not None and len(out) >= limit:
                    break
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return out


def check_qa_records(records: list[dict], path: str | Path) -> list[dict]:
    """QA records as the evaluation and the skim probe's fitting read them: ``context`` and
    ``question`` non-empty strings, ``answers`` a non-empty list of strings; the first bad one is named."""
    if not records:
        raise InputError(f"{path}: no records")
    for i, r in enumerate(records):
        for key in ("context", "question"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                problem = "missing" if key not in r else f"not a non-empty string ({type(r[key]).__name__})"
                raise InputError(f"{path}: record {i} needs context, question and non-empty answers ({key} {problem})")
        answers = r.get("answers")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise InputError(f"{path}: record {i} needs context, question and non-empty answers "
                             f"(answers {'missing' if 'answers' not in r else 'not a non-empty list of strings'})")
    return records


def doc_id_of(context: str) -> str:
    """A QA context's document id: a content hash, stable across runs."""
    return "ctx-" + hashlib.sha1(context.encode()).hexdigest()[:16]


def corpus_documents(records: Sequence[dict]) -> list:
    """One `SourceDocument` per distinct context of QA records (the corpus an evaluation retrieves from)."""
    from lclm_rag.ingest import SourceDocument

    return [SourceDocument(doc_id_of(c), c, "eval") for c in sorted({r["context"] for r in records})]


def sample_records(path: str | Path, n: int, seed: int = 0) -> list[dict]:
    """A fixed sample of ``n`` records (same seed, same questions)."""
    records = load_jsonl(path)
    rng = random.Random(seed)
    return rng.sample(records, min(n, len(records)))


def load_records(source: str | dict | DatasetSpec) -> list[dict]:
    """The records of one data source, in the project's shapes (see the module docstring)."""
    source = parse_source(source)
    if isinstance(source, str):
        if not Path(source).is_file():
            raise ConfigError(f"data file {source!r} does not exist")
        return load_jsonl(source)
    return [_normalise(row, source.columns) for row in _load_dataset(source)]


def _load_dataset(spec: DatasetSpec):
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ConfigError("dataset specs need the `datasets` package: pip install datasets") from exc
    try:
        folder = Path(spec.dataset).expanduser()
        if folder.is_dir() and any((folder / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(folder))
            if isinstance(loaded, datasets.DatasetDict):
                if spec.split not in loaded:
                    raise ConfigError(f"{spec.dataset} has splits {sorted(loaded)}, not {spec.split!r}")
                loaded = loaded[spec.split]
        else:
            loaded = datasets.load_dataset(spec.dataset, spec.name, split=spec.split, data_files=spec.data_files)
    except ConfigError:
        raise
    except Exception as exc:  # hub, network and format errors come in many types; the message is what matters
        raise ConfigError(
            f"could not load dataset {spec.describe()} ({type(exc).__name__}: {exc}); offline, use a local folder, "
            "a builder with data_files, or a JSONL file"
        ) from exc
    if spec.limit is not None:
        loaded = loaded.select(range(min(spec.limit, len(loaded))))
    missing = set(spec.columns.values()) - set(loaded.column_names)
    if missing:
        raise ConfigError(f"{spec.describe()} has no columns {sorted(missing)} (it has {loaded.column_names})")
    return loaded


def _normalise(row: dict, columns: dict[str, str]) -> dict:
    row = dict(row)
    for ours, theirs in columns.items():
        row[ours] = row[theirs]
    answers = row.get("answers")
    if isinstance(answers, dict):  # SQuAD on the hub: {"text": [...], "answer_start": [...]}
        row["answers"] = list(answers.get("text", []))
    elif isinstance(answers, str):
        row["answers"] = [answers]
    return row


def shared_contexts(train_records: list[dict], eval_path: str | Path) -> int:
    """How many of the training records' passages also appear in the evaluation file."""
    held_out = {r["context"].strip() for r in load_jsonl(eval_path) if r.get("context")}
    return len({r["context"].strip() for r in train_records if r.get("context")} & held_out)
