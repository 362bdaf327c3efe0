"""End-to-end RAG evaluation: every mode answers the same questions with the same retrieval and budget.

Modes that give the decoder text use the *base* decoder (adapters off): that is what a user
without lclm-rag runs. Modes that give it latents use the checkpoint's adapted decoder. Answers
go through the query path (`lclm_rag.rag.LatentRAG`), the one `lclm-rag query` and the
LlamaIndex classes run, so the evaluation needs no LlamaIndex.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lclm_rag.data import check_qa_records, corpus_documents, doc_id_of, load_jsonl, sample_records
from lclm_rag.errors import InputError
from lclm_rag.evaluation.measure import PeakRSS, machine_info
from lclm_rag.evaluation.metrics import score_predictions
from lclm_rag.planning import Passage, sidecar_notes
from lclm_rag.policies import POLICIES
from lclm_rag.query_config import QueryConfig
from lclm_rag.rag import Answer, LatentRAG

logger = logging.getLogger(__name__)

DEFAULT_POLICIES = ("lexical",)  # the expand mode's policy unless told: the recommended setting's (README)
RAG_MODES = ("none", "text", "text-adapted", "latent", "expand", "text-first", "auto", "llmlingua", "gold-text", "gold-latent")
PER_RATIO_MODES = ("latent", "expand", "auto", "gold-latent")


@dataclass
class Asked:
    """One answered question and what it cost."""

    text: str
    start: float  # perf_counter times: asked, first answer token, done
    first: float
    end: float
    positions: int  # decoder prompt positions of the answer's prompt
    docs: list | None = None  # doc ids retrieved (None: no retrieval)
    expanded: int = 0  # passages given as text
    expanded_docs: list | None = None  # doc ids of the retrieved passages given as text


class EvalCollection:
    """One checkpoint's collection of the corpus and how to ask it."""

    def __init__(self, model, documents, workdir: Path, embed, embedder_name: str, top_k: int, progress: bool) -> None:
        from lclm_rag.ingest import Ingestor
        from lclm_rag.store import LatentStore

        self.model, self.embed, self.top_k = model, embed, top_k
        c = model.config
        self.label = f"1:{c.ratio}"
        name = f"eval-{model.fingerprint()[:12]}-r{c.ratio}"
        self.store = LatentStore.open(name, path=workdir / name)  # the embedded engine locks its directory
        ingestor = Ingestor(self.store, model.compressor, embed)
        self.ingested = ingestor.ingest_sources(documents, progress=progress).summary()
        if top_k > self.store.count():
            raise InputError(f"top_k={top_k} but the corpus holds only {self.store.count()} passages")
        self.retrieval = {"embedder": embedder_name, "tokenizer": c.encoder, "chunk_tokens": ingestor.chunk_tokens,
                          "overlap": ingestor.overlap}
        self.reads = {"compressor": model.fingerprint(), "reader": model.decoder.fingerprint()}
        self.budget = {"pooling": c.pooling, "ratio": c.ratio, "encoder_window": c.encoder_window}
        self.rag = LatentRAG(model, self.store, embed, QueryConfig(top_k=top_k))

    def retrieve(self, question: str) -> list[Passage]:
        return self.rag.retrieve(question)

    def ask(self, question: str, expand: int | str, policy: str, max_new_tokens: int, token_budget: int | None = None) -> Asked:
        """Retrieve, plan (``expand`` passages as text, within ``token_budget``), generate; timing the first new token."""
        rag = self.rag.with_config(expand=expand, policy=policy, token_budget=token_budget, max_new_tokens=max_new_tokens)
        return _asked(rag.answer(question))

    def ask_auto(self, question: str, threshold: float, expand: int, policy: str, max_new_tokens: int) -> Asked:
        """Answer from latents; below ``threshold`` confidence expand and answer again. The time to
        first token is that of the answer returned: after the first read's whole answer when it expanded."""
        rag = self.rag.with_config(expand="auto", auto_threshold=threshold, auto_expand=expand, policy=policy,
                                   max_new_tokens=max_new_tokens)
        return _asked(rag.answer(question))

    def ask_gold_latents(self, record: dict, max_new_tokens: int) -> "Asked":
        """The gold passage's stored latents (with their sidecar, where the model reads one), no retrieval."""
        ids = self.store.ids_of_doc(doc_id_of(record["context"]))
        stored = sorted(self.store.retrieve(sorted(ids)), key=lambda p: p.payload["chunk_index"])
        passages = [Passage(p.id, p.text, None, p.latents, payload=p.payload) for p in stored]
        notes = sidecar_notes(self.model, passages, list(range(len(passages))), set())
        return _direct(self.model, record["question"], [p.latents for p in passages], max_new_tokens, notes=notes)


def _asked(answer: Answer) -> Asked:
    t = answer.timings
    plan, passages = answer.plan, answer.passages
    return Asked(answer.text, 0.0, t["first_token_s"], t["total_s"], plan.prompt_positions, [p.doc_id for p in passages],
                 len(plan.expanded), [passages[i].doc_id for i in plan.expanded])


def _direct(model, question: str, slots, max_new_tokens: int, start: float | None = None, docs: list | None = None,
            expanded: int = 0, notes: list[str] | None = None) -> Asked:
    """No retrieval (none, gold and LongLLMLingua modes): the prompt of these slots, generated as the query path does."""
    start = start or time.perf_counter()
    segments = model.decoder.qa_segments(question, slots, notes)
    text, first = LatentRAG(model, config=QueryConfig(max_new_tokens=max_new_tokens)).generate(segments)
    return Asked(text, start, first, time.perf_counter(), model.prompt_positions(segments), docs, expanded)


Job = tuple[str, Callable[[dict], Asked], Callable, dict]  # label, ask(record), context, what the answers depend on


def _jobs(modes: Sequence[str], setups: list[EvalCollection], top_k: int, expand: int, policies: Sequence[str],
          thresholds: Sequence[float], auto_policy: str, max_new_tokens: int, budgets: Sequence[int | None] = (None,)) -> list[Job]:
    """The (label, ask, context, inputs) of every mode, per ratio where the mode reads latents;
    ``expand`` once per policy and token budget, ``auto`` once per threshold (expanding by ``auto_policy``)."""
    main = setups[0]
    base_model = main.model  # its decoder with adapters disabled is "the base decoder"
    base = {"decoder": base_model.config.decoder}
    off = base_model.decoder.base
    lingua: list = []

    def llmlingua(r: dict):
        """Same retrieval; the texts pruned to as many decoder tokens as the latents take."""
        from lclm_rag.evaluation.llmlingua import LongLLMLingua

        if not lingua:
            lingua.append(LongLLMLingua(base_model.config.decoder, base_model.decoder.tokenizer))
        start = time.perf_counter()
        passages = main.retrieve(r["question"])
        budget = sum(p.latents.shape[0] for p in passages)
        compressed = lingua[0].compress(r["question"], [p.text for p in passages], budget)
        return _direct(base_model, r["question"], [compressed], max_new_tokens, start, [p.doc_id for p in passages], len(passages))

    policy = policies[0]
    builders = {
        "none": lambda s: [("none", lambda r: _direct(base_model, r["question"], [], max_new_tokens), off, base)],
        "text": lambda s: [(f"text top-{top_k}", lambda r: main.ask(r["question"], top_k, policy, max_new_tokens), off,
                            {**base, **main.retrieval})],
        "text-adapted": lambda s: [(f"text top-{top_k} (adapted decoder)", lambda r: main.ask(r["question"], top_k, policy, max_new_tokens),
                                    contextlib.nullcontext, {**base, **main.retrieval, "reader": main.reads["reader"]})],
        "latent": lambda s: [(f"latent {s.label} top-{top_k}", lambda r: s.ask(r["question"], 0, policy, max_new_tokens),
                              contextlib.nullcontext, {**base, **s.retrieval, **s.reads})],
        "expand": lambda s: [(f"expand {expand} of {top_k} ({p}) @{s.label}" + (f" within {b} positions" if b else ""),
                              lambda r, p=p, b=b: s.ask(r["question"], expand, p, max_new_tokens, b),
                              contextlib.nullcontext, {**base, **s.retrieval, **s.reads}) for p in policies for b in budgets],
        "text-first": lambda s: [(f"text first ({p}) top-{top_k}" + (f" within {b} positions" if b else ""),
                                  lambda r, p=p, b=b: main.ask(r["question"], "text", p, max_new_tokens, b),
                                  contextlib.nullcontext, {**base, **main.retrieval, "reader": main.reads["reader"]})
                                 for p in policies for b in budgets],
        "auto": lambda s: [(f"auto < {t:g}: expand {expand} ({auto_policy}) @{s.label}",
                            lambda r, t=t: s.ask_auto(r["question"], t, expand, auto_policy, max_new_tokens),
                            contextlib.nullcontext, {**base, **s.retrieval, **s.reads}) for t in thresholds],
        "gold-latent": lambda s: [(f"gold latent {s.label}", lambda r: s.ask_gold_latents(r, max_new_tokens),
                                   contextlib.nullcontext, {**base, **s.reads})],
        "gold-text": lambda s: [("gold text", lambda r: _direct(base_model, r["question"], [r["context"]], max_new_tokens, expanded=1),
                                 off, base)],
        "llmlingua": lambda s: [(f"LongLLMLingua top-{top_k} @{main.label} budget", llmlingua, off,
                                 {**base, **main.retrieval, "budget": main.budget})],
    }
    return [job for mode in modes for s in (setups if mode in PER_RATIO_MODES else [main]) for job in builders[mode](s)]


def _run_job(job: Job, records: list[dict], result: dict, save: Callable[[], None], save_every: int, progress: bool) -> None:
    """Answer every question of one mode (continuing a half-done one) and record its scores."""
    from tqdm import tqdm

    label, ask, context, _ = job
    done = result["partial"].setdefault(label, {"preds": [], "ttft": [], "total": [], "positions": [], "hits": [], "expanded": [],
                                                "gold_expanded": [], "peak_rss_mb": 0.0})
    for key in ("expanded", "gold_expanded"):
        done.setdefault(key, [])  # absent from runs saved before they were recorded
    with PeakRSS() as rss, context():
        ask(records[0])  # warm-up, not scored: one-time allocations and lazy initialisation
        todo = records[len(done["preds"]):]
        for r in tqdm(todo, desc=label, disable=not progress, initial=len(done["preds"]), total=len(records)):
            asked = ask(r)
            done["preds"].append(asked.text)
            done["ttft"].append(asked.first - asked.start)
            done["total"].append(asked.end - asked.start)
            done["positions"].append(asked.positions)
            done["expanded"].append(asked.expanded)
            gold = doc_id_of(r["context"])
            if asked.docs is not None:
                done["hits"].append(float(gold in asked.docs))
            if asked.expanded_docs is not None:
                done["gold_expanded"].append(float(gold in asked.expanded_docs))
            if len(done["preds"]) % save_every == 0:
                done["peak_rss_mb"] = max(done["peak_rss_mb"], rss.peak_bytes / 2**20)
                save()
    done["peak_rss_mb"] = max(done["peak_rss_mb"], rss.peak_bytes / 2**20)
    ttft, total, positions, hits, expanded = done["ttft"], done["total"], done["positions"], done["hits"], done["expanded"]
    scores = score_predictions(label, done["preds"], records, sum(total)).as_dict()
    scores.update(recall_at_k=sum(hits) / len(hits) if hits else None, prompt_positions=sum(positions) / len(positions),
                  passages_expanded=sum(expanded) / len(expanded) if len(expanded) == len(positions) else None,
                  gold_expanded=_mean(done["gold_expanded"]) if len(done["gold_expanded"]) == len(positions) else None,
                  ttft_s=sum(ttft) / len(ttft), total_s=sum(total) / len(total), peak_rss_mb=done["peak_rss_mb"])
    del scores["seconds_per_question"]
    result["scores"].append(scores)
    result["predictions"][label] = done["preds"]
    del result["partial"][label]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def run_rag_eval(data: str | Path, checkpoints: Sequence, modes: Sequence[str] = RAG_MODES, *, limit: int = 500,
                 seed: int = 0, top_k: int = 5, expand: int = 1, expand_policy: str | Sequence[str] = DEFAULT_POLICIES,
                 auto_thresholds: Sequence[float] = (0.5,), auto_policy: str | None = None,
                 token_budgets: Sequence[int | None] = (None,), max_new_tokens: int = 32,
                 workdir: str | Path | None = None, embedder: str | None = None, output: str | Path | None = None,
                 resume: bool = False, save_every: int = 20, progress: bool = True) -> dict:
    """Ingest the distinct contexts of ``data`` into a fresh collection per checkpoint, then answer a
    fixed sample of its questions in every mode through the query path.

    ``checkpoints``: one per ratio (e.g. the 1:4 and 1:8 defaults), each a checkpoint name or
    path, ``None`` (the packaged default) or a loaded ``LatentContextModel``; the first also sets
    the LongLLMLingua budget (its latent positions for the same retrieved passages) and provides
    the base decoder. Returns (and writes to ``output``) scores, predictions and the machine.

    ``expand`` runs once per policy in ``expand_policy`` (one name or several) and token budget in
    ``token_budgets`` (None: no budget; a number: the lowest-ranked latents make room, `plan_prompt`), and ``auto`` once
    per threshold in ``auto_thresholds`` (expanding ``expand`` passages by ``auto_policy``, default
    the first of ``expand_policy``), so one
    run draws the quality-cost curve of skim-then-expand beside its references.

    ``output`` is rewritten after every mode and every ``save_every`` questions; with ``resume`` a
    run that stopped (a 500-question run takes hours on a CPU) continues from it: finished modes
    are kept, a half-done mode goes on from its next question. Resuming needs the same data, sample
    and settings, otherwise nothing is overwritten and an error says what differs. Each mode records
    what its answers depend on (``mode_inputs``: base decoder, retrieval, compressor and reader
    fingerprints), so resuming with a retrained checkpoint recomputes only the modes that read it;
    the replaced results are kept in ``<output>.previous.json``.
    """
    import tempfile

    from lclm_rag.embedding import Embedder
    from lclm_rag.hub import DEFAULT_EMBEDDER
    from lclm_rag.model import LatentContextModel, load_model

    policies = [expand_policy] if isinstance(expand_policy, str) else list(expand_policy)
    auto_policy = auto_policy or (policies[0] if policies else None)
    if not policies or set(policies + [auto_policy]) - set(POLICIES):
        raise InputError(f"expand policies must be some of {POLICIES}, got {policies} (auto: {auto_policy})")
    if not token_budgets or any(b is not None and b <= 0 for b in token_budgets):
        raise InputError(f"token budgets must be positive numbers of positions or None, got {list(token_budgets)}")
    if any(not 0.0 <= t <= 1.0 for t in auto_thresholds):
        raise InputError(f"auto thresholds must lie in [0, 1], got {list(auto_thresholds)}")
    unknown = set(modes) - set(RAG_MODES)
    if unknown:
        raise InputError(f"unknown modes {sorted(unknown)}; choose from {RAG_MODES}")
    if not checkpoints:
        raise InputError("at least one checkpoint is needed")
    if resume and not output:
        raise InputError("resume continues the run saved in output: give the output path")
    previous = saved_run(output) if resume and output and Path(output).exists() else None  # checked before any model loads
    all_records = check_qa_records(load_jsonl(data), data)
    records = sample_records(data, limit, seed=seed)  # the sample paired_comparison draws again
    temp = None if workdir else tempfile.TemporaryDirectory(prefix="lclm-rag-eval-")
    workdir = Path(workdir or temp.name)
    embed = Embedder(embedder or DEFAULT_EMBEDDER)
    documents = corpus_documents(all_records)
    models = [c if isinstance(c, LatentContextModel) else load_model(c) for c in checkpoints]
    if "skim" in policies + [auto_policy]:
        for m in models:
            m.require_skim_probe()  # no probe for a reader: a clear error before anything is ingested
    setups = [EvalCollection(m, documents, workdir, embed, embedder or DEFAULT_EMBEDDER, top_k, progress) for m in models]
    jobs = _jobs(modes, setups, top_k, expand, policies, list(auto_thresholds), auto_policy, max_new_tokens, list(token_budgets))
    result = {"data": str(data), "n": len(records), "corpus_passages": {s.label: s.store.count() for s in setups},
              "seed": seed, "top_k": top_k, "expand": expand, "expand_policy": expand_policy if isinstance(expand_policy, str) else policies,
              "auto_thresholds": list(auto_thresholds), "token_budgets": list(token_budgets), "max_new_tokens": max_new_tokens,
              "checkpoints": {s.label: s.model.fingerprint() for s in setups},
              "readers": {s.label: s.reads["reader"] for s in setups},
              "ingested": {s.label: s.ingested for s in setups}, "machine": machine_info(), "scores": [], "predictions": {},
              "partial": {}, "mode_inputs": {label: inputs for label, _, _, inputs in jobs}}
    if previous is not None:
        result = _resumable(previous, result, output)

    def save() -> None:
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(result, indent=2))

    order = [job[0] for job in jobs]
    for job in jobs:
        if job[0] in result["predictions"]:
            continue  # finished in an earlier run
        _run_job(job, records, result, save, save_every, progress)
        result["scores"].sort(key=lambda row: order.index(row["mode"]) if row["mode"] in order else len(order))
        save()
    for s in setups:
        s.store.close()
    if temp is not None:
        temp.cleanup()
    return result


def saved_run(output: str | Path) -> dict:
    """The run saved in ``output``, or one clear error when it is not one (truncated, not JSON, another file)."""
    try:
        saved = json.loads(Path(output).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot resume {output}: it is not a saved evaluation ({exc}); use another --output or drop "
                         "--resume to start over") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("predictions"), dict) or not isinstance(saved.get("scores"), list):
        raise InputError(f"cannot resume {output}: it is not a saved evaluation (no predictions and scores); use another "
                         "--output or drop --resume to start over")
    return saved


_RUN_SETTINGS = ("data", "n", "seed", "top_k", "expand", "max_new_tokens")  # policies and budgets are in the mode labels


def _resumable(previous: dict, fresh: dict, output) -> dict:
    """The earlier run's results whose inputs are unchanged; modes that read a changed model are redone.

    Files written before ``mode_inputs`` existed are kept whole when the checkpoints match.
    """
    differs = [k for k in _RUN_SETTINGS if previous.get(k) != fresh[k]]
    if differs:
        detail = ", ".join(f"{k}: {previous.get(k)!r} there, {fresh[k]!r} now" for k in differs)
        raise InputError(f"cannot resume {output}: it is a different evaluation ({detail}); "
                         "use another --output or drop --resume to start over")
    if "mode_inputs" in previous:
        old_inputs = previous["mode_inputs"]
    elif previous.get("checkpoints") == fresh["checkpoints"]:
        old_inputs = fresh["mode_inputs"]
    else:
        old_inputs = {}
    keep = {label for label, inputs in fresh["mode_inputs"].items() if old_inputs.get(label) == inputs}
    stale = (set(previous["predictions"]) | set(previous.get("partial", {}))) - keep
    if stale:
        backup = Path(f"{output}.previous.json")
        backup.write_text(json.dumps(previous, indent=2))
        logger.warning("resuming %s: %s read a changed model or retrieval and are redone (old results in %s)",
                       output, sorted(stale), backup)
    fresh.update(scores=[row for row in previous["scores"] if row["mode"] in keep],
                 predictions={k: v for k, v in previous["predictions"].items() if k in keep},
                 partial={k: v for k, v in previous.get("partial", {}).items() if k in keep})
    same = [label for label in fresh["checkpoints"] if previous.get("checkpoints", {}).get(label) == fresh["checkpoints"][label]]
    fresh["ingested"].update({label: previous["ingested"][label] for label in same if label in previous.get("ingested", {})})
    fresh["resumed_from"] = previous.get("machine", {}).get("date")
    if stale:
        fresh["redone"] = sorted(stale)
    return fresh
