"""Greedy answers and prompt plans of the query path, in every expand mode and policy, as JSON.

Run once on one version of the code and once on another, then ``--compare A.json B.json``: a
refactoring of the query path must leave every answer and every plan (which passages went in as
latents, as text or dropped, the prompt positions, the auto decision) identical.

    python scripts/query_path_answers.py --workdir runs/query-path --output runs/query-path/before.json
    python scripts/query_path_answers.py --compare runs/query-path/before.json runs/query-path/after.json \
        --output results/query_path_identity_examples_squad_dev50_r4_1ebe1c7b.json

Questions: one per example document (``examples/docs``) and the first ``--limit`` of a fixed
squad_dev sample, retrieved from a corpus of the distinct contexts of a larger sample of the same
file (``--corpus``). The collections are built once in ``--workdir`` and reused, so both runs
read the same stored points. Everything goes through ``LatentQueryEngine``, whose name and
arguments are the README's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SQUAD = REPO.parent / "shared" / "data" / "qa" / "squad_dev.jsonl"
EXAMPLE_QUESTIONS = [
    "Who is the Eiffel Tower named after?",
    "When did Apollo 11 land on the Moon?",
    "Where is the Great Barrier Reef?",
    "What do plants make in photosynthesis?",
]
MODES = {  # label -> LatentQueryEngine settings
    "latent": {"expand": 0},
    **{f"expand1-{p}": {"expand": 1, "expand_policy": p} for p in ("score", "lexical", "fused", "attention", "skim")},
    "expand2-fused": {"expand": 2, "expand_policy": "fused"},
    "expand1-lexical-budget279": {"expand": 1, "expand_policy": "lexical", "token_budget": 279},
    "fit-budget279-score": {"expand": 0, "expand_policy": "score", "token_budget": 279},
    "auto-attention-0.5": {"expand": "auto", "expand_policy": "attention", "auto_threshold": 0.5},
    "auto-lexical-0.7": {"expand": "auto", "expand_policy": "lexical", "auto_threshold": 0.7},
}
SQUAD_MODES = [m for m in MODES if m not in ("expand2-fused", "fit-budget279-score", "auto-lexical-0.7")]  # what 2 cores allow


def build(workdir: Path, corpus: int) -> dict[str, tuple[Path, list[str]]]:
    """The two collections (built once) and their questions."""
    from lclm_rag.ingest import Ingestor, SourceDocument

    from lclm_rag.data import sample_records
    from lclm_rag.embedding import Embedder
    from lclm_rag.model import load_compressor
    from lclm_rag.store import LatentStore

    sample = sample_records(SQUAD, corpus, seed=0)
    out = {"examples": (workdir / "examples", EXAMPLE_QUESTIONS), "squad_dev": (workdir / "squad_dev", [r["question"] for r in sample])}
    if (workdir / "built").exists():
        return out
    compressor, embedder = load_compressor(), Embedder()
    with LatentStore.open("examples", path=out["examples"][0]) as store:
        Ingestor(store, compressor, embedder).ingest_paths([REPO / "examples" / "docs"])
    contexts = sorted({r["context"] for r in sample})
    docs = [SourceDocument("ctx-" + hashlib.sha1(c.encode()).hexdigest()[:16], c, "squad_dev") for c in contexts]
    with LatentStore.open("squad_dev", path=out["squad_dev"][0]) as store:
        Ingestor(store, compressor, embedder).ingest_sources(docs)
    (workdir / "built").write_text("")
    return out


def answers(workdir: Path, limit: int, corpus: int, max_new_tokens: int, output: Path) -> dict:
    """Every mode's answers, written to ``output`` after each mode; a mode already there is kept (a stopped run resumes)."""
    from lclm_rag.integrations.llama_index import LatentQueryEngine, LatentRetriever

    from lclm_rag.embedding import Embedder
    from lclm_rag.model import load_model
    from lclm_rag.store import LatentStore

    result: dict = {"max_new_tokens": max_new_tokens, "limit": limit, "corpus_sample": corpus}
    if output.exists():
        result = json.loads(output.read_text())
        assert (result["max_new_tokens"], result["limit"], result["corpus_sample"]) == (max_new_tokens, limit, corpus), "other settings"
    model, embedder = load_model(), Embedder()
    for name, (path, questions) in build(workdir, corpus).items():
        questions = questions[:limit] if name == "squad_dev" else questions
        runs = result.setdefault(name, {})
        for label in MODES if name == "examples" else SQUAD_MODES:
            if label in runs:
                continue
            settings, start = MODES[label], time.perf_counter()
            store = LatentStore.open(name, path=path)
            engine = LatentQueryEngine.from_args(LatentRetriever(store, embedder, similarity_top_k=5), model=model,
                                                 max_new_tokens=max_new_tokens, **settings)
            rows = []
            for q in questions:
                response = engine.query(q)
                meta = response.metadata
                rows.append({"question": q, "answer": response.response,
                             "plan": [[p["node_id"], p["mode"]] for p in meta["passages"]],
                             "prompt_positions": meta["prompt_positions"],
                             "auto": None if "auto" not in meta else [meta["auto"]["expanded"], round(meta["auto"]["confidence"], 4)]})
            store.close()
            runs[label] = rows
            output.write_text(json.dumps(result, indent=1) + "\n")
            print(f"{name} {label}: {len(rows)} questions, {time.perf_counter() - start:.0f} s", flush=True)
    return result


def compare(a: dict, b: dict) -> dict:
    """Per collection and mode: how many answers, plans, positions and auto decisions are identical."""
    out: dict = {"modes": list(MODES), "squad_dev_modes": SQUAD_MODES}
    for name in ("examples", "squad_dev"):
        rows = {}
        for label in [m for m in a[name] if m in b[name]]:
            x, y = a[name][label], b[name][label]
            assert [r["question"] for r in x] == [r["question"] for r in y], f"{name} {label}: other questions"
            rows[label] = {
                "questions": len(x),
                "same_answer": sum(p["answer"] == q["answer"] for p, q in zip(x, y, strict=True)),
                "same_plan": sum(p["plan"] == q["plan"] for p, q in zip(x, y, strict=True)),
                "same_positions": sum(p["prompt_positions"] == q["prompt_positions"] for p, q in zip(x, y, strict=True)),
                "same_auto": sum(p["auto"] == q["auto"] for p, q in zip(x, y, strict=True)),
            }
        out[name] = rows
    total = [r for name in ("examples", "squad_dev") for r in out[name].values()]
    out["all_identical"] = all(r["questions"] == r["same_answer"] == r["same_plan"] == r["same_positions"] == r["same_auto"]
                               for r in total)
    out["answers_compared"] = sum(r["questions"] for r in total)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/query-path")
    parser.add_argument("--limit", type=int, default=50, help="squad_dev questions asked (50 x 8 modes: ~20 minutes on 2 busy cores)")
    parser.add_argument("--corpus", type=int, default=300, help="squad_dev records whose distinct contexts are the corpus")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        result = {"before": args.compare[0], "after": args.compare[1], **compare(before, after)}
    else:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        result = answers(Path(args.workdir), args.limit, args.corpus, args.max_new_tokens, Path(args.output))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in MODES}, indent=1)[:3000] if args.compare else args.output)


if __name__ == "__main__":
    main()
