"""Which passage is worth expanding: how often each expansion policy puts the gold passage among
the ones it expands, on the same retrieved sets.

The question a skim-then-expand reader has to answer before it spends text positions: of the k
retrieved passages, read as latents, which n go back in as text? A policy is as good as the share
of questions whose gold passage it expands; ``score`` (retrieval order) and ``lexical`` (BM25)
decide blind, ``attention`` asks the decoder, ``skim`` weighs what the decoder's heads show with a
probe fitted on a training split.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from lclm_rag.data import check_qa_records, corpus_documents, doc_id_of, load_jsonl, sample_records
from lclm_rag.errors import InputError
from lclm_rag.evaluation.measure import machine_info
from lclm_rag.evaluation.rag import EvalCollection
from lclm_rag.policies import POLICIES, rank_for_expansion


def run_expansion_recall(data: str | Path, model, *, limit: int = 500, seed: int = 0, top_k: int = 5,
                         counts: Sequence[int] = (1, 2), policies: Sequence[str] | None = None, workdir: str | Path | None = None,
                         output: str | Path | None = None, progress: bool = True) -> dict:
    """Per policy and count n: the share of questions whose gold passage is among the n expanded
    (over all questions, and over those whose gold passage was retrieved at all), and the time
    the ranking took. ``model`` is a loaded ``LatentContextModel``; the corpus is the distinct
    contexts of ``data``, ingested once into ``workdir`` (reused by later runs). ``policies``
    default to all, ``skim`` where the model has a fitted probe."""
    from lclm_rag.embedding import Embedder
    from lclm_rag.hub import DEFAULT_EMBEDDER

    if policies is None:
        policies = [p for p in POLICIES if p != "skim" or model.skim_probe is not None]
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise InputError(f"unknown policies {sorted(unknown)}; choose from {POLICIES}")
    if not counts or min(counts) < 1 or max(counts) > top_k:
        raise InputError(f"counts must lie in 1..top_k={top_k}, got {list(counts)}")
    records = sample_records(data, limit, seed=seed)
    temp = None if workdir else tempfile.TemporaryDirectory(prefix="lclm-rag-expansion-")
    collection = EvalCollection(model, corpus_documents(check_qa_records(load_jsonl(data), data)), Path(workdir or temp.name), Embedder(DEFAULT_EMBEDDER),
                                DEFAULT_EMBEDDER, top_k, progress)
    hits = {p: {n: 0 for n in counts} for p in policies}
    seconds = {p: 0.0 for p in policies}
    retrieved = 0
    try:
        for record in records:
            passages = collection.retrieve(record["question"])
            gold = doc_id_of(record["context"])
            retrieved += any(p.doc_id == gold for p in passages)
            for policy in policies:
                start = time.perf_counter()
                ranking = rank_for_expansion(record["question"], passages, policy, model)
                seconds[policy] += time.perf_counter() - start
                for n in counts:
                    hits[policy][n] += any(passages[i].doc_id == gold for i in ranking[:n])
    finally:
        collection.store.close()
        if temp is not None:
            temp.cleanup()
    n_q = len(records)
    rows = [{"policy": p, **{f"gold_in_top{n}": hits[p][n] / n_q for n in counts},
             **{f"gold_in_top{n}_when_retrieved": hits[p][n] / max(retrieved, 1) for n in counts},
             "ms_per_question": 1000 * seconds[p] / n_q} for p in policies]
    result = {"data": str(data), "n": n_q, "seed": seed, "top_k": top_k, "gold_retrieved": retrieved / n_q,
              "checkpoint": model.fingerprint(), "reader": model.decoder.fingerprint(), "machine": machine_info(), "scores": rows}
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2))
    return result
