"""The command line's query-side commands: ``query``, ``eval``, ``compare`` and ``fit-skim-probe``.

``query`` runs `lclm_rag.rag.LatentRAG` directly, so it needs no LlamaIndex; its flags' defaults
are `QueryConfig`'s and the ``--policy`` choices are the registered policies.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from lclm_rag.cli_args import (
    add_engine_args,
    add_store_args,
    budget_or_none,
    check_engine_args,
    check_question,
    check_store_path,
    expand_count,
    fraction,
    load_reader,
    open_store,
    read_json_file,
)
from lclm_rag.errors import InputError
from lclm_rag.policies import POLICIES
from lclm_rag.query_config import QueryConfig

EXPAND_POLICIES = list(POLICIES)


def cmd_query(args: argparse.Namespace) -> int:
    from lclm_rag.query_config import QueryConfig

    check_question(args.question)  # before the heavy imports: a bad question fails at once
    check_engine_args(args)
    config = QueryConfig(top_k=args.top_k, expand=args.expand, policy=args.policy, token_budget=args.token_budget,
                         latency_budget_s=args.latency_budget, auto_threshold=args.auto_threshold,
                         max_new_tokens=args.max_new_tokens)
    check_store_path(args)
    from lclm_rag.rag import LatentRAG

    with open_store(args) as store:
        store.require()  # a missing collection fails before the model loads
        rag = LatentRAG(load_reader(args.checkpoint, args), store, config=config)
        start = time.perf_counter()
        answer = rag.stream(args.question) if args.stream else rag.answer(args.question)
        if args.stream:
            print("answer: ", end="", flush=True)
            for piece in answer.pieces:
                print(piece, end="", flush=True)
            print()
        else:
            print(f"answer: {answer.text}")
        print("sources:")
        for i in answer.kept:
            p = answer.passages[i]
            where = f"{(p.payload or {}).get('doc_id', '?')}#{(p.payload or {}).get('chunk_index', '?')}"
            print(f"  {p.score:.3f}  [{answer.mode(i):>6}]  {where}  {p.text[:70]!r}")
        if answer.auto is not None:
            print(f"auto-expand: {answer.auto['reason']} (policy {answer.auto['policy']})")
        print(f"decoder prompt positions: {answer.prompt_positions}, expanded: {len(answer.plan.expanded)}, "
              f"total {time.perf_counter() - start:.2f} s (retrieve {answer.timings['retrieve_s']:.2f} s)")
    return 0


def _rounded_table(rows: list[dict]) -> str:
    """Score rows as a markdown table, floats to 4 decimals."""
    from lclm_rag.evaluation.measure import markdown_table

    return markdown_table([{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows])


def cmd_eval(args: argparse.Namespace) -> int:
    from lclm_rag.evaluation import GOLD_MODES, RAG_MODES, run_gold_eval, run_rag_eval
    from lclm_rag.evaluation.plots import plot_quality_cost

    checkpoints = args.checkpoint or [None]
    modes = args.modes.split(",") if args.modes else list(GOLD_MODES if args.gold else RAG_MODES)
    known = GOLD_MODES if args.gold else RAG_MODES
    if set(modes) - set(known):
        raise InputError(f"unknown modes {sorted(set(modes) - set(known))}; choose from {', '.join(known)}")
    thresholds = [fraction(t, "--auto-thresholds") for t in args.auto_thresholds.split(",")]
    budgets = [budget_or_none(b, "--token-budgets") for b in args.token_budgets.split(",")]
    if args.latent_dtype is not None and not args.gold:
        raise InputError("--latent-dtype applies to --gold (a RAG run reads the latents its collection stores)")
    if not Path(args.data).is_file():
        raise InputError(f"{args.data}: no such file")
    if args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    QueryConfig(top_k=args.top_k, expand=args.expand, max_new_tokens=args.max_new_tokens)  # the query settings' own checks
    from lclm_rag.data import check_qa_records, load_jsonl

    check_qa_records(load_jsonl(args.data), args.data)  # a malformed file fails before any model loads
    if args.resume and args.output and Path(args.output).exists() and not args.gold:
        from lclm_rag.evaluation.rag import saved_run

        saved_run(args.output)  # so does a damaged run to resume
    readers = [load_reader(c, args) for c in checkpoints]
    if args.expansion_recall:
        from lclm_rag.evaluation.expansion import run_expansion_recall

        result = run_expansion_recall(args.data, readers[0], limit=args.limit, seed=args.seed, top_k=args.top_k,
                                      workdir=args.workdir, output=args.output)
        print(f"gold passage retrieved in the top {args.top_k}: {result['gold_retrieved']:.3f} of {result['n']} questions")
        print(_rounded_table(result["scores"]))
        return 0
    if args.gold:
        result = run_gold_eval(readers[0], args.data, modes, args.limit, seed=args.seed,
                               max_new_tokens=args.max_new_tokens, output=args.output, latent_dtype=args.latent_dtype)
    else:
        result = run_rag_eval(args.data, readers, modes, limit=args.limit, seed=args.seed, top_k=args.top_k,
                              expand=args.expand, **({"expand_policy": args.policy.split(",")} if args.policy else {}),
                              auto_thresholds=thresholds, auto_policy=args.auto_policy, token_budgets=budgets,
                              max_new_tokens=args.max_new_tokens, workdir=args.workdir, output=args.output, resume=args.resume)
        if args.plot:
            plot_quality_cost(result, args.plot, cost={"ttft": "ttft_s", "positions": "prompt_positions"}[args.plot_x])
    table = _rounded_table(result["scores"])
    if args.output:
        machine = result.get("machine") or {}
        header = f"{result['n']} questions of {args.data}, seed {args.seed}" + (f", measured {machine['date']} on {machine['cores']} cores" if machine else "")
        Path(args.output).with_suffix(".md").write_text(header + "\n\n" + table + "\n")
    print(table)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lclm_rag.evaluation import paired_comparison

    results = [read_json_file(path, "an `lclm-rag eval --output` result") for path in (args.new, args.old)]
    rows = paired_comparison(*results, mode=args.mode, old_mode=args.old_mode, data=args.data, by=args.by)
    print(f"{args.new} [{args.mode}] - {args.old} [{args.old_mode or args.mode}], paired over the same questions\n")
    print(_rounded_table(rows))
    return 0


def cmd_fit_skim_probe(args: argparse.Namespace) -> int:
    import tempfile

    from lclm_rag.model import load_model
    from lclm_rag.training.skim_probe import fit_skim_probe

    missing = [d for d in args.data if not Path(d).is_file()]
    if missing:
        raise InputError(f"{missing[0]}: no such file")
    if args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    QueryConfig(top_k=args.top_k)
    if not math.isfinite(args.l2) or args.l2 < 0:
        raise InputError(f"--l2 must be a finite penalty >= 0, got {args.l2}")
    from lclm_rag.data import check_qa_records, load_jsonl

    for path in args.data:  # every file checked before the model loads
        check_qa_records(load_jsonl(path), path)
    model = load_model(args.checkpoint)
    output = args.output or model.directory
    if output is None:
        raise InputError("--output is needed: the model was not loaded from a checkpoint directory")
    with tempfile.TemporaryDirectory(prefix="lclm-rag-skim-") as temp:
        probe = fit_skim_probe(model, args.data, args.limit, seed=args.seed, top_k=args.top_k, l2=args.l2,
                               workdir=args.workdir or temp)
    print(f"skim probe for reader {probe.reader[:12]} ({probe.trained_on}): {probe.save_pretrained(output)}")
    return 0


def add_query_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="answer a question from a collection's stored latents")
    p.add_argument("question")
    add_store_args(p)
    p.add_argument("--checkpoint", help="model checkpoint (default: the packaged one; must match the collection)")
    p.add_argument("--top-k", type=int, default=QueryConfig.top_k, help="passages retrieved (all are read as latents)")
    p.add_argument("--expand", type=expand_count, default=QueryConfig.expand,
                   help="passages expanded back to raw text; 'auto': answer from latents, expand only when unsure; "
                   "'text': no latents, as many passages as text as --token-budget holds, best first")
    p.add_argument("--policy", choices=EXPAND_POLICIES, default=None,
                   help="which passages to expand first (default: score; attention with --expand auto): retrieval "
                        "score, BM25 of the question, both fused, the decoder's attention when it reads every passage as latents, "
                        "or the checkpoint's fitted skim probe (lclm-rag fit-skim-probe)")
    p.add_argument("--auto-threshold", type=float, default=QueryConfig.auto_threshold,
                   help="--expand auto: expand when the latent answer's confidence (mean token probability) is below this")
    p.add_argument("--token-budget", type=int, help="fit the decoder prompt into this many positions: the --expand best "
                   "go in as text, the lowest-ranked latents make room (without --expand: as many expanded as fit)")
    p.add_argument("--latency-budget", type=float, metavar="SECONDS",
                   help="expand only as many passages as keep the time to first token within this (measured prefill cost)")
    p.add_argument("--max-new-tokens", type=int, default=QueryConfig.max_new_tokens)
    p.add_argument("--stream", action="store_true")
    add_engine_args(p)
    p.set_defaults(func=cmd_query)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="RAG quality and cost on SQuAD-format records: compressed vs full text vs LongLLMLingua")
    p.add_argument("data", help="JSONL with context, question, answers; the distinct contexts become the corpus")
    p.add_argument("--checkpoint", action="append", help="repeat for each ratio (default: the packaged default)")
    p.add_argument("--modes", help="comma-separated; RAG: none, text, text-adapted, latent, expand, text-first, auto, llmlingua, gold-text, "
                   "gold-latent (default all); --gold: none, text, text-base, latent, latent-control, key-terms, lead, "
                   "latent+key-terms[-control], latent+lead[-control], key-terms@sidecar, lead@sidecar")
    p.add_argument("--gold", action="store_true", help="reading only: each question with its gold passage, batched")
    p.add_argument("--latent-dtype", choices=["float16", "uint8"],
                   help="--gold: latents as a collection of this type gives them back (default: as the encoder made them)")
    p.add_argument("--expansion-recall", action="store_true",
                   help="how often each expansion policy (score, lexical, fused, attention, skim) expands the gold passage, top-k retrieval")
    p.add_argument("--top-k", type=int, default=QueryConfig.top_k)
    p.add_argument("--expand", type=int, default=1, help="passages expanded to text in the expand and auto modes")
    p.add_argument("--policy", default=None,
                   help=f"comma-separated expansion policies ({', '.join(POLICIES)}): the expand and text-first modes run "
                        "once per policy (default: lexical, the recommended setting's)")
    p.add_argument("--token-budgets", default="none",
                   help="comma-separated decoder position budgets ('none': no budget): the expand and text-first modes "
                        "run once per budget (expand: the lowest-ranked latents make room for the expansion; "
                        "text-first: as many passages as text as fit, no latents)")
    p.add_argument("--auto-thresholds", default="0.5",
                   help="comma-separated confidence thresholds: the auto mode runs once per threshold")
    p.add_argument("--auto-policy", choices=EXPAND_POLICIES, default=None,
                   help="which passage the auto mode expands (default: the first --policy)")
    p.add_argument("--workdir", help="keep the evaluation collections here (re-runs reuse them)")
    p.add_argument("--plot", help="PNG of quality against cost, one point per mode")
    p.add_argument("--plot-x", choices=["ttft", "positions"], default="ttft",
                   help="the plot's cost axis: time to first token, or decoder prompt positions")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--output", help="JSON with scores and predictions (rewritten as the run goes)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run saved in --output")
    add_engine_args(p)
    p.set_defaults(func=cmd_eval)


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="paired difference of two `eval --output` results on the same questions, with standard errors")
    p.add_argument("new", help="result JSON of the newer checkpoint")
    p.add_argument("old", help="result JSON to compare it with (the same data, sample size and seed)")
    p.add_argument("--mode", default="latent", help="predictions to compare (default: latent)")
    p.add_argument("--old-mode", help="predictions to read in OLD (default: --mode), e.g. text against latent")
    p.add_argument("--data", help="the data file, when the path recorded in the results does not resolve from here")
    p.add_argument("--by", choices=["answer-position", "answer-kind"],
                   help="break F1 and contained down by where in the passage the answer sits, or by its kind")
    p.set_defaults(func=cmd_compare)


def add_fit_skim_probe_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit-skim-probe", help="fit the skim expansion policy's probe on training QA files, saved beside the checkpoint")
    p.add_argument("data", nargs="+", help="JSONL files with context, question, answers (training splits, never the evaluation one)")
    p.add_argument("--checkpoint", help="model checkpoint (default: the packaged one)")
    p.add_argument("--limit", type=int, default=1200, help="questions sampled from each file")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--top-k", type=int, default=QueryConfig.top_k)
    p.add_argument("--l2", type=float, default=0.03, help="L2 penalty (0.03: best of 0.001-0.1 fitting on one training file, scoring on the other)")
    p.add_argument("--workdir", help="keep the collections and features here (a refit reuses them)")
    p.add_argument("--output", help="directory of the probe file (default: the checkpoint's)")
    p.set_defaults(func=cmd_fit_skim_probe)
