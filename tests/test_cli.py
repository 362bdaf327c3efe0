import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_offline():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "lclm_rag.cli", "demo", "--max-new-tokens", "8"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "latents of width 576" in res.stdout and "answer  from latents" in res.stdout
    assert "Loading weights" not in res.stderr and "Warning" not in res.stderr, res.stderr[-2000:]  # a quiet first run


@pytest.mark.slow
def test_bad_checkpoint_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "lclm_rag.cli", "demo", "--checkpoint", str(tmp_path / "nope")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 3 and "is neither a directory, a packaged checkpoint" in res.stderr


@pytest.mark.slow
def test_eval_rejects_unknown_modes_and_missing_data(tmp_path):
    res = subprocess.run([sys.executable, "-m", "lclm_rag.cli", "eval", str(tmp_path / "none.jsonl"), "--modes", "latent,oracle"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "unknown modes ['oracle']" in res.stderr
    res = subprocess.run([sys.executable, "-m", "lclm_rag.cli", "eval", str(tmp_path / "none.jsonl")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "no such file" in res.stderr
    res = subprocess.run([sys.executable, "-m", "lclm_rag.cli", "eval", str(tmp_path / "none.jsonl"), "--modes", "auto",
                          "--auto-thresholds", "0.3,high"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == ["error: --auto-thresholds: 'high' is not a number"]
    for budgets, message in (("none,many", "'many' is neither a number of positions nor 'none'"), ("0", "0 positions hold nothing")):
        res = subprocess.run([sys.executable, "-m", "lclm_rag.cli", "eval", str(tmp_path / "none.jsonl"), "--modes", "expand",
                              "--token-budgets", budgets], capture_output=True, text=True, timeout=600)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and message in res.stderr


@pytest.mark.slow
def test_compare_prints_the_paired_table_of_two_results(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"context": "c", "question": "q", "answers": ["Paris"]}\n{"context": "d", "question": "r", "answers": ["Paris"]}\n')
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    new.write_text(json.dumps({"data": str(data), "n": 2, "seed": 0, "predictions": {"latent": ["Paris", "Paris"]}}))
    old.write_text(json.dumps({"data": str(data), "n": 2, "seed": 0, "predictions": {"latent": ["Paris", "Milan"]}}))
    res = subprocess.run([sys.executable, "-m", "lclm_rag.cli", "compare", str(new), str(old)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| exact_match | 1.0 | 0.5 | 0.5 | 0.5 | 1.0 |" in res.stdout
    res = subprocess.run([sys.executable, "-m", "lclm_rag.cli", "compare", str(new), str(tmp_path / "none.json")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "none.json: no such file" in res.stderr


def test_cli_compare_groupings_are_the_evaluations():
    import argparse

    from lclm_rag.cli_query import add_compare_parser
    from lclm_rag.evaluation import GROUPINGS

    sub = argparse.ArgumentParser().add_subparsers()
    add_compare_parser(sub)
    by = next(a for a in sub.choices["compare"]._actions if a.dest == "by")
    assert by.choices == list(GROUPINGS)


def test_cli_policy_choices_are_the_planners():
    from lclm_rag.cli_query import EXPAND_POLICIES
    from lclm_rag.policies import POLICIES

    assert EXPAND_POLICIES == list(POLICIES)


def test_every_command_prints_its_help():
    """argparse formats help strings with %: a literal percent sign must be written %%."""
    import argparse

    from lclm_rag.cli import build_parser

    def commands(parser: argparse.ArgumentParser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from commands(child)

    helps = [p.format_help() for p in commands(build_parser())]
    assert len(helps) > 8 and all("usage:" in h for h in helps)
