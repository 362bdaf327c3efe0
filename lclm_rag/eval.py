"""QA and restoration metrics, and the evaluation loops that use them.

Scores are read together: answer contained, SQuAD exact match and F1, and mean answer length
(a model that "contains" more answers by talking longer has not improved).
"""

from __future__ import annotations

import json
import logging
import random
import re
import string
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lclm_rag.data import load_jsonl, sample_records
from lclm_rag.errors import InputError

logger = logging.getLogger(__name__)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    def f1(pred: str, gold: str) -> float:
        p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
        common = sum((Counter(p) & Counter(g)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    return max(f1(prediction, a) for a in answers)


def answer_contained(prediction: str, answers: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(a) and normalize_answer(a) in pred for a in answers))


def is_numeric_answer(answer: str) -> bool:
    return any(ch.isdigit() for ch in answer)


def is_capitalised_answer(answer: str) -> bool:
    return answer.strip()[:1].isupper()


def in_passage(prediction: str, passage: str) -> bool:
    """Does the (normalised) answer occur in the (normalised) passage? An empty answer does not."""
    pred = normalize_answer(prediction)
    return bool(pred) and f" {pred} " in f" {normalize_answer(passage)} "


@dataclass
class QAScores:
    """Scores of one mode. The diagnostics say where answers go wrong: ``not_in_passage`` is the
    share of answers found nowhere in the gold passage (invented rather than read), and
    ``numeric_em`` / ``capitalised_em`` are EM over the questions whose first gold answer holds a
    digit / starts with a capital (names, places), counted in ``numeric_n`` / ``capitalised_n``."""

    mode: str
    n: int
    answer_contained: float
    exact_match: float
    f1: float
    mean_answer_words: float
    seconds_per_question: float
    not_in_passage: float = float("nan")
    numeric_n: int = 0
    numeric_em: float = float("nan")
    capitalised_n: int = 0
    capitalised_em: float = float("nan")

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def _subset_mean(values: list[float], keep: list[bool]) -> tuple[int, float]:
    chosen = [v for v, k in zip(values, keep) if k]
    return len(chosen), (sum(chosen) / len(chosen) if chosen else float("nan"))


def score_predictions(mode: str, predictions: Sequence[str], records: Sequence[dict], seconds: float) -> QAScores:
    n = len(records)
    answers = [r["answers"] for r in records]
    em = [exact_match(p, a) for p, a in zip(predictions, answers)]
    numeric_n, numeric_em = _subset_mean(em, [is_numeric_answer(a[0]) for a in answers])
    capitalised_n, capitalised_em = _subset_mean(em, [is_capitalised_answer(a[0]) for a in answers])
    return QAScores(
        mode=mode,
        n=n,
        answer_contained=sum(answer_contained(p, a) for p, a in zip(predictions, answers)) / n,
        exact_match=sum(em) / n,
        f1=sum(f1_score(p, a) for p, a in zip(predictions, answers)) / n,
        mean_answer_words=sum(len(p.split()) for p in predictions) / n,
        seconds_per_question=seconds / n,
        not_in_passage=sum(not in_passage(p, r["context"]) for p, r in zip(predictions, records)) / n,
        numeric_n=numeric_n, numeric_em=numeric_em, capitalised_n=capitalised_n, capitalised_em=capitalised_em,
    )


GOLD_MODES = ("none", "text", "text-base", "latent", "latent-control")


def evaluate_gold_passage(model, records: Sequence[dict], mode: str, max_new_tokens: int = 32, batch_size: int = 8) -> tuple[QAScores, list[str]]:
    """QA with the gold passage only (reading, not retrieval). Modes:

    ``none`` no context; ``text`` full passage as text; ``text-base`` the same with the decoder's
    adapters disabled (the base decoder); ``latent`` the passage compressed; ``latent-control``
    the latents of *another* question's passage (what the decoder answers from its prior).
    """
    import contextlib

    if mode not in GOLD_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {GOLD_MODES}")
    base = model.decoder.base() if mode == "text-base" else contextlib.nullcontext()
    preds: list[str] = []
    start = time.perf_counter()
    with base:
        for b in range(0, len(records), batch_size):
            batch = records[b : b + batch_size]
            questions = [r["question"] for r in batch]
            if mode == "none":
                contexts = [[] for _ in batch]
            elif mode in ("text", "text-base"):
                contexts = [[r["context"]] for r in batch]
            else:
                latents = model.compress([r["context"] for r in batch])
                if mode == "latent-control":
                    latents = latents[1:] + latents[:1] if len(latents) > 1 else model.compress([records[(b + len(batch)) % len(records)]["context"]])
                contexts = [[lat] for lat in latents]
            preds.extend(model.answer(questions, contexts, max_new_tokens=max_new_tokens))
    return score_predictions(mode, preds, records, time.perf_counter() - start), preds


def run_gold_eval(model, data: str | Path, modes: Sequence[str], limit: int, seed: int = 0, max_new_tokens: int = 32,
                  output: str | Path | None = None) -> dict:
    """Every mode on the same fixed sample of questions; optional JSON output with predictions."""
    records = sample_records(data, limit, seed=seed)
    result = {"data": str(data), "n": len(records), "seed": seed, "max_new_tokens": max_new_tokens,
              "fingerprint": model.fingerprint(), "ratio": model.config.ratio, "scores": [], "predictions": {}}
    for mode in modes:
        scores, preds = evaluate_gold_passage(model, records, mode, max_new_tokens=max_new_tokens)
        result["scores"].append(scores.as_dict())
        result["predictions"][mode] = preds
        if output:  # after every mode: an interrupted run keeps what it measured
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(result, indent=2))
    return result


PAIRED_METRICS = {"answer_contained": answer_contained, "exact_match": exact_match, "f1": f1_score,
                  "answer_words": lambda prediction, _answers: float(len(prediction.split()))}


def paired_comparison(new: dict, old: dict, mode: str = "latent", old_mode: str | None = None,
                      data: str | Path | None = None) -> list[dict]:
    """Per-question differences ``new - old`` on the same questions, with their standard errors.

    Two checkpoints that answer the same questions are compared on each question, not on two
    independent means: the standard error of the paired difference is what says whether a gain
    of a point or two is more than the noise of 500 questions. ``new`` and ``old`` are results
    written by ``lclm-rag eval --output`` (gold or RAG); ``mode`` names the predictions to read in
    ``new`` and ``old_mode`` (default: the same) in ``old``, so a latent row can be set against
    a text row. ``data`` overrides the data file recorded in the results (they record the path
    as it was given, relative to where the evaluation ran).
    """
    old_mode = old_mode or mode
    for label, result, m in (("new", new, mode), ("old", old, old_mode)):
        if m not in result.get("predictions", {}):
            raise InputError(f"the {label} result has no predictions for mode {m!r}; it has {sorted(result.get('predictions', {}))}")
    differs = [k for k in ("n", "seed") if new.get(k) != old.get(k)]
    if Path(str(new.get("data"))).name != Path(str(old.get("data"))).name:
        differs.append("data")
    if differs:
        raise InputError("the two results did not answer the same questions: "
                         + ", ".join(f"{k} {new.get(k)!r} vs {old.get(k)!r}" for k in differs))
    path = Path(data or new["data"])
    if not path.is_file():
        raise InputError(f"{path}: no such file (the results' data file); pass the data file to compare them")
    records = sample_records(path, new["n"], seed=new["seed"])
    predictions = {"new": new["predictions"][mode], "old": old["predictions"][old_mode]}
    for label, preds in predictions.items():
        if len(preds) != len(records):
            raise InputError(f"the {label} result has {len(preds)} predictions for {len(records)} questions (an unfinished run?)")
    rows = []
    for name, metric in PAIRED_METRICS.items():
        values = {label: torch.tensor([metric(p, r["answers"]) for p, r in zip(preds, records)], dtype=torch.float64)
                  for label, preds in predictions.items()}
        diffs = values["new"] - values["old"]
        mean = diffs.mean().item()
        se = (diffs.std() / len(diffs) ** 0.5).item() if len(diffs) > 1 else float("nan")
        rows.append({"metric": name, "new": values["new"].mean().item(), "old": values["old"].mean().item(),
                     "difference": mean, "standard_error": se, "in_standard_errors": mean / se if se > 0 else float("nan")})
    return rows


TOKEN_CLASSES = ("all", "digit", "capitalised")


def token_classes(tokenizer, text: str) -> list[set[str]]:
    """The classes of each token of ``text`` (decoder ids, no special tokens), plus EOS (``all`` only).

    ``digit``: the token holds a digit; ``capitalised``: the token belongs to a word that starts
    with an upper-case letter (names, places, sentence starts).
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    words = [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+", text)]
    classes = []
    for start, end in enc["offset_mapping"]:
        piece = text[start:end]
        found = {"all"}
        if any(ch.isdigit() for ch in piece):
            found.add("digit")
        word = next((w for a, b, w in words if a <= start < b or (start < a < end)), "")
        if word[:1].isupper():
            found.add("capitalised")
        classes.append(found)
    return classes + [{"all"}]


@torch.no_grad()
def restoration_breakdown(model, passages: Sequence[str], control: bool = False) -> dict[str, dict]:
    """Restoration accuracy per token class (``TOKEN_CLASSES``): where the latents lose information.

    Returns ``{class: {"correct", "total", "accuracy"}}``; ``control`` as in ``restoration_accuracy``.
    """
    from lclm_rag.train import restoration_example, teacher_forced_batch

    latents = model.compressor.encode_ids(model.compressor.tokenize(passages))
    if control:
        latents = latents[1:] + latents[:1]
    _, hits = teacher_forced_batch(model, [restoration_example(p) for p in passages], latents, per_token=True)
    counts = {c: [0, 0] for c in TOKEN_CLASSES}
    for passage, row in zip(passages, hits, strict=True):
        classes = token_classes(model.decoder.tokenizer, passage)
        if len(classes) != len(row):
            raise RuntimeError(f"token classes ({len(classes)}) and restored tokens ({len(row)}) disagree")
        for found, hit in zip(classes, row.tolist()):
            for c in found:
                counts[c][0] += int(hit)
                counts[c][1] += 1
    return {c: {"correct": k, "total": n, "accuracy": k / n if n else float("nan")} for c, (k, n) in counts.items()}


@torch.no_grad()
def restoration_accuracy(model, passages: Sequence[str], control: bool = False) -> float:
    """Teacher-forced next-token accuracy of rebuilding each passage from its latents.

    ``control=True`` feeds every passage the latents of another passage: what the decoder
    gets right from its own prior, the number the real score must beat.
    """
    from lclm_rag.train import restoration_example, teacher_forced_batch

    latents = model.compressor.encode_ids(model.compressor.tokenize(passages))
    if control:
        latents = latents[1:] + latents[:1]
    examples = [restoration_example(p) for p in passages]
    _, correct, total = teacher_forced_batch(model, examples, latents)
    return correct / max(total, 1)


# ---------------------------------------------------------------------- end-to-end RAG evaluation
# Every mode answers the same questions with the same retrieval and the same generation budget.
# Modes that give the decoder text use the *base* decoder (adapters off): that is what a user
# without lclm-rag runs. Modes that give it latents use the checkpoint's adapted decoder.
RAG_MODES = ("none", "text", "text-adapted", "latent", "expand", "llmlingua", "gold-text", "gold-latent")
PER_RATIO_MODES = ("latent", "expand", "gold-latent")


class FirstTokenTimer:
    """A ``generate`` streamer that only notes when the first new token arrives."""

    def __init__(self) -> None:
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1  # call 1 is the prompt, call 2 the first generated token
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()


class _DecoderTokenCounter:
    """tiktoken's ``encode``/``decode`` over the decoder's tokenizer, so budgets count decoder positions."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str, **_) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)


class LongLLMLingua:
    """LongLLMLingua (``llmlingua`` package) with a local small LM, budgeted in decoder tokens.

    ``PromptCompressor`` counts its budget with tiktoken's GPT-3.5 encoding, which it downloads;
    here the budget is the *decoder's* token count (the quantity that costs prefill time), so the
    counter is the decoder tokenizer and nothing is fetched. Settings follow LlamaIndex's
    ``LongLLMLinguaPostprocessor`` defaults (question-aware coarse ranking, sorted contexts,
    dynamic ratio 0.3, ``condition_compare``).
    """

    SETTINGS = dict(rank_method="longllmlingua", condition_in_question="after_condition", reorder_context="sort",
                    dynamic_context_compression_ratio=0.3, condition_compare=True, context_budget="+100")

    def __init__(self, model_name_or_path: str, decoder_tokenizer) -> None:
        from llmlingua import PromptCompressor

        from lclm_rag.hub import resolve_model

        compressor = PromptCompressor.__new__(PromptCompressor)  # its __init__ would fetch tiktoken data
        compressor.model_name, compressor.use_llmlingua2, compressor.open_api_config = str(model_name_or_path), False, {}
        compressor.retrieval_model = compressor.retrieval_model_name = None
        compressor.cache_bos_num, compressor.prefix_bos_num = 10, 100
        compressor.oai_tokenizer = _DecoderTokenCounter(decoder_tokenizer)
        compressor.load_model(resolve_model(model_name_or_path), "cpu", {})
        self.compressor = compressor

    def compress(self, question: str, texts: Sequence[str], target_tokens: int) -> str:
        result = self.compressor.compress_prompt(list(texts), question=question, target_token=target_tokens,
                                                 concate_question=False, **self.SETTINGS)
        return result["compressed_prompt"]


def corpus_documents(records: Sequence[dict]):
    """One LlamaIndex ``Document`` per distinct context; ids are content hashes (stable across runs)."""
    from llama_index.core import Document

    return [Document(text=c, id_=_doc_id(c)) for c in sorted({r["context"] for r in records})]


def _doc_id(context: str) -> str:
    import hashlib

    return "ctx-" + hashlib.sha1(context.encode()).hexdigest()[:16]


def _check_records(records: Sequence[dict], path) -> None:
    for i, r in enumerate(records):
        missing = [k for k in ("context", "question", "answers") if k not in r]
        if missing or not r.get("answers"):
            raise InputError(f"{path}: record {i} needs context, question and non-empty answers (missing {missing or ['answers']})")


def run_rag_eval(data: str | Path, checkpoints: Sequence, modes: Sequence[str] = RAG_MODES, *, limit: int = 500,
                 seed: int = 0, top_k: int = 5, expand: int = 1, expand_policy: str = "lexical", max_new_tokens: int = 32,
                 workdir: str | Path | None = None, embedder: str | None = None, output: str | Path | None = None,
                 resume: bool = False, save_every: int = 20, progress: bool = True) -> dict:
    """Ingest the distinct contexts of ``data`` into a fresh collection per checkpoint, then answer a
    fixed sample of its questions in every mode through the query engine.

    ``checkpoints``: one per ratio (e.g. the 1:4 and 1:8 defaults), each a checkpoint name or
    path, ``None`` (the packaged default) or a loaded ``LatentContextModel``; the first also sets
    the LongLLMLingua budget (its latent positions for the same retrieved passages) and provides
    the base decoder. Returns (and writes to ``output``) scores, predictions and the machine.

    ``output`` is rewritten after every mode and every ``save_every`` questions; with ``resume`` a
    run that stopped (a 500-question run takes hours on a CPU) continues from it: finished modes
    are kept, a half-done mode goes on from its next question. Resuming needs the same data, sample
    and settings, otherwise nothing is overwritten and an error says what differs. Each mode records
    what its answers depend on (``mode_inputs``: base decoder, retrieval, compressor and reader
    fingerprints), so resuming with a retrained checkpoint recomputes only the modes that read it;
    the replaced results are kept in ``<output>.previous.json``.
    """
    import contextlib
    import tempfile

    from llama_index.core.schema import QueryBundle
    from tqdm import tqdm

    from lclm_rag.bench import PeakRSS, machine_info
    from lclm_rag.embedding import Embedder
    from lclm_rag.hub import DEFAULT_EMBEDDER
    from lclm_rag.ingest import Ingestor
    from lclm_rag.integrations.llama_index import LatentQueryEngine, LatentRetriever
    from lclm_rag.model import LatentContextModel, load_model
    from lclm_rag.store import LatentStore

    unknown = set(modes) - set(RAG_MODES)
    if unknown:
        raise InputError(f"unknown modes {sorted(unknown)}; choose from {RAG_MODES}")
    if not checkpoints:
        raise InputError("at least one checkpoint is needed")
    if resume and not output:
        raise InputError("resume continues the run saved in output: give the output path")
    all_records = load_jsonl(data)
    _check_records(all_records, data)
    records = random.Random(seed).sample(all_records, min(limit, len(all_records)))
    documents = corpus_documents(all_records)
    temp = None if workdir else tempfile.TemporaryDirectory(prefix="lclm-rag-eval-")
    workdir = Path(workdir or temp.name)
    embed = Embedder(embedder or DEFAULT_EMBEDDER)

    setups = []  # one per checkpoint: label, model, its collection and a retriever over it
    for checkpoint in checkpoints:
        model = checkpoint if isinstance(checkpoint, LatentContextModel) else load_model(checkpoint)
        name = f"eval-{model.fingerprint()[:12]}-r{model.config.ratio}"
        store = LatentStore.open(name, path=workdir / name)  # the embedded engine locks its directory
        ingestor = Ingestor(store, model.compressor, embed)
        report = ingestor.ingest_documents(documents, progress=progress)
        retriever = LatentRetriever(store, embed, similarity_top_k=top_k)
        c = model.config
        retrieval = {"embedder": embedder or DEFAULT_EMBEDDER, "tokenizer": c.encoder, "chunk_tokens": ingestor.chunk_tokens,
                     "overlap": ingestor.overlap}
        reads = {"compressor": model.fingerprint(), "reader": model.decoder.fingerprint()}
        setups.append({"label": f"1:{c.ratio}", "model": model, "store": store, "retriever": retriever,
                       "ingested": report.summary(), "retrieval": retrieval, "reads": reads,
                       "budget": {"pooling": c.pooling, "ratio": c.ratio, "encoder_window": c.encoder_window}})
    main = setups[0]
    base_model = main["model"]  # its decoder with adapters disabled is "the base decoder"
    base = {"decoder": base_model.config.decoder}

    def engine(setup, expand_n):
        return LatentQueryEngine(setup["retriever"], setup["model"], expand=expand_n, expand_policy=expand_policy,
                                 max_new_tokens=max_new_tokens)

    def via_engine(eng, question):
        """Ask through LatentQueryEngine, timing the first new token with a streamer."""
        timer = FirstTokenTimer()
        eng.generate_kwargs["streamer"] = timer
        start = time.perf_counter()
        response = eng.query(question)
        end = time.perf_counter()
        docs = [n.node.metadata.get("doc_id") for n in response.source_nodes]
        return str(response), start, timer.first, end, response.metadata["prompt_positions"], docs

    def direct(model, question, slots, start=None):
        timer = FirstTokenTimer()
        start = start or time.perf_counter()
        segments = model.decoder.qa_segments(question, slots)
        text = model.decoder.generate_from_segments([segments], max_new_tokens=max_new_tokens, streamer=timer)[0]
        return text, start, timer.first, time.perf_counter(), model.prompt_positions(segments), None

    lingua = None
    jobs = []  # (mode label, per-question function, context manager, what its answers depend on)
    for mode in modes:
        targets = setups if mode in PER_RATIO_MODES else [main]
        for setup in targets:
            if mode == "none":
                jobs.append(("none", lambda r: direct(base_model, r["question"], []), base_model.decoder.base, base))
            elif mode == "text":
                jobs.append((f"text top-{top_k}", lambda r, e=engine(main, top_k): via_engine(e, r["question"]), base_model.decoder.base,
                             {**base, **main["retrieval"]}))
            elif mode == "text-adapted":
                jobs.append((f"text top-{top_k} (adapted decoder)", lambda r, e=engine(main, top_k): via_engine(e, r["question"]),
                             contextlib.nullcontext, {**base, **main["retrieval"], "reader": main["reads"]["reader"]}))
            elif mode == "latent":
                jobs.append((f"latent {setup['label']} top-{top_k}", lambda r, e=engine(setup, 0): via_engine(e, r["question"]),
                             contextlib.nullcontext, {**base, **setup["retrieval"], **setup["reads"]}))
            elif mode == "expand":
                jobs.append((f"expand {expand} of {top_k} @{setup['label']}", lambda r, e=engine(setup, expand): via_engine(e, r["question"]),
                             contextlib.nullcontext, {**base, **setup["retrieval"], **setup["reads"]}))
            elif mode == "gold-latent":
                def gold_latent(r, s=setup):
                    start = time.perf_counter()
                    ids = s["store"].ids_of_doc(_doc_id(r["context"]))
                    stored = sorted(s["store"].retrieve(sorted(ids)), key=lambda p: p.payload["chunk_index"])
                    return direct(s["model"], r["question"], [p.latents for p in stored], start)
                jobs.append((f"gold latent {setup['label']}", gold_latent, contextlib.nullcontext, {**base, **setup["reads"]}))
            elif mode == "gold-text":
                jobs.append(("gold text", lambda r: direct(base_model, r["question"], [r["context"]]), base_model.decoder.base, base))
            elif mode == "llmlingua":
                if lingua is None:
                    lingua = LongLLMLingua(base_model.config.decoder, base_model.decoder.tokenizer)

                def llmlingua(r):
                    """Same retrieval; the texts pruned to as many decoder tokens as the latents take."""
                    start = time.perf_counter()
                    nodes = main["retriever"].retrieve(QueryBundle(r["question"]))
                    budget = sum(main["retriever"].cache.get(n.node.node_id)[0].shape[0] for n in nodes)
                    compressed = lingua.compress(r["question"], [n.node.get_content() for n in nodes], budget)
                    out = direct(base_model, r["question"], [compressed], start)
                    return (*out[:5], [n.node.metadata.get("doc_id") for n in nodes])
                jobs.append((f"LongLLMLingua top-{top_k} @{main['label']} budget", llmlingua, base_model.decoder.base,
                             {**base, **main["retrieval"], "budget": main["budget"]}))

    result = {"data": str(data), "n": len(records), "corpus_passages": {s["label"]: s["store"].count() for s in setups},
              "seed": seed, "top_k": top_k, "expand": expand, "expand_policy": expand_policy, "max_new_tokens": max_new_tokens,
              "checkpoints": {s["label"]: s["model"].fingerprint() for s in setups},
              "readers": {s["label"]: s["reads"]["reader"] for s in setups},
              "ingested": {s["label"]: s["ingested"] for s in setups}, "machine": machine_info(), "scores": [], "predictions": {},
              "partial": {}, "mode_inputs": {label: inputs for label, _, _, inputs in jobs}}
    if resume and output and Path(output).exists():
        result = _resumable(json.loads(Path(output).read_text()), result, output)

    def save() -> None:
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(result, indent=2))

    for label, ask, context, _ in jobs:
        if label in result["predictions"]:
            continue  # finished in an earlier run
        # per-question columns, continued from an interrupted run if there is one
        done = result["partial"].setdefault(label, {"preds": [], "ttft": [], "total": [], "positions": [], "hits": [], "peak_rss_mb": 0.0})
        with PeakRSS() as rss, context():
            ask(records[0])  # warm-up, not scored: one-time allocations and lazy initialisation
            todo = records[len(done["preds"]):]
            for r in tqdm(todo, desc=label, disable=not progress, initial=len(done["preds"]), total=len(records)):
                text, start, first, end, n_positions, docs = ask(r)
                done["preds"].append(text)
                done["ttft"].append(first - start)
                done["total"].append(end - start)
                done["positions"].append(n_positions)
                if docs is not None:
                    done["hits"].append(float(_doc_id(r["context"]) in docs))
                if len(done["preds"]) % save_every == 0:
                    done["peak_rss_mb"] = max(done["peak_rss_mb"], rss.peak_bytes / 2**20)
                    save()
        done["peak_rss_mb"] = max(done["peak_rss_mb"], rss.peak_bytes / 2**20)
        ttft, total, positions, hits = done["ttft"], done["total"], done["positions"], done["hits"]
        scores = score_predictions(label, done["preds"], records, sum(total)).as_dict()
        scores.update(recall_at_k=sum(hits) / len(hits) if hits else None, prompt_positions=sum(positions) / len(positions),
                      ttft_s=sum(ttft) / len(ttft), total_s=sum(total) / len(total), peak_rss_mb=done["peak_rss_mb"])
        del scores["seconds_per_question"]
        result["scores"].append(scores)
        result["predictions"][label] = done["preds"]
        del result["partial"][label]
        order = [job[0] for job in jobs]
        result["scores"].sort(key=lambda row: order.index(row["mode"]) if row["mode"] in order else len(order))
        save()
    for s in setups:
        s["store"].close()
    if temp is not None:
        temp.cleanup()
    return result


_RUN_SETTINGS = ("data", "n", "seed", "top_k", "expand", "expand_policy", "max_new_tokens")


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


def plot_quality_latency(result: dict, png_path: str | Path, metric: str = "f1") -> None:
    """Quality against time to first token, one point per mode, with the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result["scores"], key=lambda r: r["ttft_s"])
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(rows):
        oracle = r["mode"].startswith("gold")  # gold passage given, not retrieved: a reference, not an option
        ax.scatter(r["ttft_s"], r[metric], s=30, facecolors="none" if oracle else None, edgecolors="C0" if oracle else None)
        ax.annotate(r["mode"], (r["ttft_s"], r[metric]), fontsize=7, xytext=(4, 3 - 9 * (i % 2)), textcoords="offset points")
    front, best = [], -1.0
    for r in rows:  # fastest first: on the front if nothing faster is at least as good
        if not r["mode"].startswith("gold") and r[metric] > best:
            front.append(r)
            best = r[metric]
    ax.plot([r["ttft_s"] for r in front], [r[metric] for r in front], "k--", lw=0.8, label="Pareto front (hollow: gold passage, reference)")
    ax.set_xlabel("time to first token per question (s)")
    ax.set_ylabel({"f1": "SQuAD F1", "exact_match": "exact match", "answer_contained": "answer contained"}.get(metric, metric))
    ax.set_title(f"{Path(result['data']).name}: {result['n']} questions, top-{result['top_k']}, {result['max_new_tokens']} new tokens",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
