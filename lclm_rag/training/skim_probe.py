"""Fit the ``skim`` expansion policy's probe on a training split (`lclm_rag.skim`).

For each training question, its file's distinct contexts are the corpus (ingested once into the
work directory, as `lclm-rag eval` does); the query path (`lclm_rag.rag.LatentRAG`) retrieves the
top-k passages, and the decoder, reading them as latents, gives each head's calibrated attention
mass on each one (`lclm_rag.policies.question_attention`, what the ``skim`` policy reads); with BM25 and the retrieval
score these are one retrieved set's features, and the gold passage (the question's own context) is
the label. Features are cached per file, sample and reader, so a refit (another L2, more files)
costs no model call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from lclm_rag.data import check_qa_records, corpus_documents, doc_id_of, load_jsonl, sample_records
from lclm_rag.errors import InputError
from lclm_rag.model import LatentContextModel
from lclm_rag.policies import lexical_relevance, question_attention
from lclm_rag.query_config import QueryConfig
from lclm_rag.rag import LatentRAG
from lclm_rag.skim import SkimProbe, fit_listwise, skim_features


def skim_examples(model: LatentContextModel, data: str | Path, limit: int, *, seed: int = 1, top_k: int = 5,
                  workdir: str | Path, progress: bool = True) -> list[dict]:
    """Per question: ``gold`` (is each retrieved passage the question's context), ``score``, ``bm25``
    and ``heads`` (layers x heads x passages calibrated attention masses). Cached in ``workdir``."""
    data, workdir = Path(data), Path(workdir)
    if not data.is_file():
        raise InputError(f"{data}: no such file")
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / f"features_{data.stem}_{limit}_{seed}_{model.fingerprint()[:8]}_{model.decoder.fingerprint()[:8]}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from lclm_rag.embedding import Embedder
    from lclm_rag.hub import DEFAULT_EMBEDDER
    from lclm_rag.ingest import Ingestor
    from lclm_rag.store import LatentStore

    records = sample_records(data, limit, seed=seed)
    name = f"eval-{model.fingerprint()[:12]}-r{model.config.ratio}"  # the collection `lclm-rag eval` builds of this corpus
    embedder = Embedder(DEFAULT_EMBEDDER)
    rows = []
    with LatentStore.open(name, path=workdir / data.stem / name) as store:
        Ingestor(store, model.compressor, embedder).ingest_sources(corpus_documents(check_qa_records(load_jsonl(data), data)),
                                                                   progress=progress)
        if top_k > store.count():
            raise InputError(f"top_k={top_k} but the corpus holds only {store.count()} passages")
        rag = LatentRAG(model, store, embedder, QueryConfig(top_k=top_k))
        with torch.no_grad():
            for record in records:
                passages = rag.retrieve(record["question"])
                heads = question_attention(model, record["question"], [p.latents for p in passages])
                rows.append({"gold": [p.doc_id == doc_id_of(record["context"]) for p in passages], "score": [p.score for p in passages],
                             "bm25": lexical_relevance(record["question"], [p.text for p in passages]), "heads": heads.tolist()})
    cache.write_text(json.dumps(rows))
    return rows


def fit_skim_probe(model: LatentContextModel, data: Sequence[str | Path], limit: int = 1200, *, seed: int = 1, top_k: int = 5,
                   l2: float = 0.03, workdir: str | Path, progress: bool = True) -> SkimProbe:
    """A probe for ``model``'s reader, fitted on ``limit`` questions of each training file in ``data``."""
    if not data:
        raise InputError("fitting the skim probe needs at least one training file")
    rows, counts = [], {}
    for path in data:
        examples = skim_examples(model, path, limit, seed=seed, top_k=top_k, workdir=workdir, progress=progress)
        rows += examples
        counts[Path(path).name] = len(examples)
    weights = fit_listwise([skim_features(torch.tensor(r["heads"]), r["bm25"], r["score"]) for r in rows], [r["gold"] for r in rows], l2)
    return SkimProbe(weights.float(), model.decoder.fingerprint(), json.dumps({"questions": counts, "top_k": top_k, "l2": l2}))
