"""Data sources: JSONL files and Hugging Face `datasets` (local folders and builders; no hub here)."""

import json
from pathlib import Path

import datasets
import pytest

from lclm_rag.data import DatasetSpec, load_records, parse_source, shared_contexts
from lclm_rag.errors import ConfigError

SQUAD_STYLE = [  # the hub's SQuAD layout: answers as {"text": [...], "answer_start": [...]}
    {"id": "a", "context": "Paris is the capital of France.", "question": "Capital of France?",
     "answers": {"text": ["Paris", "Paris"], "answer_start": [0, 0]}},
    {"id": "b", "context": "The Nile flows north.", "question": "Which way does the Nile flow?",
     "answers": {"text": ["north"], "answer_start": [16]}},
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_path_loads_as_is(tmp_path):
    rows = [{"text": "one"}, {"text": "two"}]
    assert load_records(str(_write_jsonl(tmp_path / "c.jsonl", rows))) == rows


def test_builder_with_data_files_flattens_squad_answers(tmp_path):
    path = _write_jsonl(tmp_path / "squad_train.json", SQUAD_STYLE)
    records = load_records({"dataset": "json", "data_files": str(path), "split": "train"})
    assert [r["answers"] for r in records] == [["Paris", "Paris"], ["north"]]
    assert records[1]["context"] == "The Nile flows north."


def test_saved_folder_with_split_column_rename_and_limit(tmp_path):
    folder = tmp_path / "news"
    rows = {"article": ["First story.", "Second story.", "Third story."], "id": ["1", "2", "3"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(folder))
    records = load_records({"dataset": str(folder), "split": "train", "columns": {"text": "article"}, "limit": 2})
    assert [r["text"] for r in records] == ["First story.", "Second story."]
    with pytest.raises(ConfigError, match="splits"):
        load_records({"dataset": str(folder), "split": "test"})
    with pytest.raises(ConfigError, match="no columns"):
        load_records({"dataset": str(folder), "columns": {"text": "body"}})


def test_evaluation_only_data_is_refused():
    with pytest.raises(ConfigError, match="evaluation only"):
        parse_source("../shared/data/qa/squad_dev.jsonl")
    with pytest.raises(ConfigError, match="evaluation only"):
        parse_source({"dataset": "rajpurkar/squad", "split": "validation"})
    assert isinstance(parse_source({"dataset": "rajpurkar/squad", "split": "train"}), DatasetSpec)


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_source({"dataset": "json", "splits": "train"})
    with pytest.raises(ConfigError, match="needs `dataset`"):
        parse_source({"split": "train"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="JSONL path or a dataset spec"):
        parse_source(42)
    with pytest.raises(ConfigError, match="could not load dataset"):
        load_records({"dataset": "json", "data_files": str(tmp_path / "nothing-*.json")})


def test_shared_contexts_counts_passages_in_the_eval_file(tmp_path):
    eval_file = _write_jsonl(tmp_path / "dev.jsonl", [{"context": "Paris is the capital of France. ", "question": "q", "answers": ["x"]}])
    assert shared_contexts([{"context": "Paris is the capital of France."}, {"context": "Other."}], eval_file) == 1
    assert shared_contexts([{"context": "Other."}], eval_file) == 0
