"""The command line's shared argument groups, argument types and early checks (all before any
model loads, so a mistake fails at once)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from lclm_rag.chunking import check_chunking
from lclm_rag.errors import InputError, StoreError

MAX_QUESTION_CHARS = 8_000  # longer questions are refused before any model loads
DECODER_TIMEOUT_S = 300.0  # how long a decoder server may take to answer


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--collection", required=True, help="collection name")
    p.add_argument("--path", help="embedded store directory (default: $LCLM_RAG_HOME/collections/NAME)")
    p.add_argument("--qdrant-url", help="Qdrant server or cluster URL (gRPC preferred)")
    p.add_argument("--api-key", default=os.environ.get("QDRANT_API_KEY"), help="Qdrant API key (or $QDRANT_API_KEY)")
    p.add_argument("--backend", choices=["auto", "edge", "qdrant"], default="auto",
                   help="edge: Qdrant engine in-process (default); qdrant: qdrant-client (local path or :memory:)")


def check_store_path(args: argparse.Namespace) -> None:
    """A --path that is a file, or an unusable $LCLM_RAG_HOME under the default path, fails before
    the store, the models and LlamaIndex are imported."""
    if args.path and Path(args.path).is_file():
        raise StoreError(f"{args.path} is a file, not a collection directory: choose another --path")
    if not args.path and not args.qdrant_url:
        from lclm_rag.hub import lclm_home

        lclm_home()


def check_qdrant_url(url: str | None) -> None:
    """A --qdrant-url that cannot name a Qdrant server (scheme, host, port) fails before anything opens."""
    if url is None:
        return
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")  # qdrant-client reads HOST:PORT as http
        port = parts.port
    except ValueError as exc:
        raise InputError(f"--qdrant-url {url!r} is not a URL ({exc}); e.g. http://localhost:6333") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"--qdrant-url {url!r} must be http(s)://HOST[:PORT], e.g. http://localhost:6333")
    if port == 0:
        raise InputError(f"--qdrant-url {url!r}: port 0 is not a server's port")


def open_store(args: argparse.Namespace):
    """The collection's store; a server that is not Qdrant, or a local path another process holds,
    is one `StoreError` naming it (the client libraries' own errors are many and long)."""
    from lclm_rag.errors import LclmRagError
    from lclm_rag.store import LatentStore

    check_qdrant_url(args.qdrant_url)
    try:
        return LatentStore.open(args.collection, path=args.path, url=args.qdrant_url, api_key=args.api_key, backend=args.backend)
    except (LclmRagError, OSError):
        raise
    except Exception as exc:  # qdrant-client: HTTP, gRPC, pydantic and lock errors
        where = args.qdrant_url or args.path or args.collection
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise StoreError(f"cannot open collection {args.collection!r} at {where}: {first} "
                         "(is it a Qdrant server? is another process using this path?)") from exc



def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="decode with transformers (default) or vLLM in this process (pip install 'lclm-rag[vllm]')")
    p.add_argument("--decoder-url", help="decode on a `vllm serve <serving copy> --enable-prompt-embeds` server, "
                                         "e.g. http://127.0.0.1:8000/v1 (`lclm-rag export-decoder` writes the copy)")
    p.add_argument("--engine-args", type=json_object, default={},
                   help='vllm.LLM settings as JSON, e.g. \'{"enable_prefix_caching": true, "enforce_eager": true}\'')
    p.add_argument("--decoder-timeout", type=float, default=DECODER_TIMEOUT_S, metavar="SECONDS",
                   help=f"with --decoder-url: how long to wait for the server (default {DECODER_TIMEOUT_S:g})")


def expand_count(text: str) -> int | str:
    """``--expand``: a number of passages, ``auto`` or ``text``."""
    if text in ("auto", "text"):
        return text
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def json_object(text: str) -> dict:
    """A JSON object argument (argparse turns the ValueError into a one-line usage error)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


def check_engine_args(args: argparse.Namespace) -> None:
    if args.engine_args and args.decoder_url:
        raise InputError("--engine-args are settings of vLLM in this process; a server (--decoder-url) takes its own "
                         "settings at `vllm serve`: drop one of them")
    if args.engine_args and args.engine == "hf":
        raise InputError("--engine-args are vLLM settings: add --engine vllm")
    timeout = getattr(args, "decoder_timeout", DECODER_TIMEOUT_S)
    if not math.isfinite(timeout) or timeout <= 0:
        raise InputError(f"--decoder-timeout must be a positive number of seconds, got {timeout}")


def use_engine_from_args(model, args: argparse.Namespace):
    """Put ``model`` on the decode engine the arguments ask for."""
    if args.decoder_url:
        model.use_engine("vllm", url=args.decoder_url, timeout=getattr(args, "decoder_timeout", DECODER_TIMEOUT_S))
    elif args.engine != "hf":
        model.use_engine(args.engine, **args.engine_args)
    return model


def load_reader(checkpoint: str | None, args: argparse.Namespace):
    """The checkpoint, decoding on the engine the arguments ask for."""
    from lclm_rag.model import load_model

    check_engine_args(args)
    return use_engine_from_args(load_model(checkpoint), args)


def check_question(question: str) -> str:
    """Refuse an empty or oversized question before any model loads."""
    if not question.strip():
        raise InputError("the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise InputError(f"the question is {len(question):,} characters; the limit is {MAX_QUESTION_CHARS:,} "
                         "(put long material in the collection, not in the question)")
    return question



def read_json_file(path: str, what: str) -> object:
    """A JSON file's content, or one clear error naming the file and what it should be."""
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not JSON ({exc}); expected {what}") from None


def fraction(value: str, flag: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise InputError(f"{flag}: {value!r} is not a number") from None
    if not 0.0 <= number <= 1.0:
        raise InputError(f"{flag}: {number} is not in [0, 1]")
    return number


def budget_or_none(value: str, flag: str) -> int | None:
    """A positive number of decoder positions, or ``none`` for no budget."""
    if value.strip().lower() == "none":
        return None
    try:
        number = int(value)
    except ValueError:
        raise InputError(f"{flag}: {value!r} is neither a number of positions nor 'none'") from None
    if number <= 0:
        raise InputError(f"{flag}: {number} positions hold nothing; give a positive budget or 'none'")
    return number


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """--shard i/n as (i, n); None for no sharding."""
    if value is None:
        return None
    try:
        index, count = (int(x) for x in value.split("/"))
    except ValueError as exc:
        raise InputError(f"--shard must look like i/n (e.g. 0/4), got {value!r}") from exc
    if not 0 <= index < count:
        raise InputError(f"--shard {value}: need 0 <= i < n")
    return index, count


def check_ingest_args(args: argparse.Namespace) -> tuple[int, int] | None:
    """The ingest command's own checks, before the models load or a collection is created (so a
    mistake leaves nothing behind); returns --shard as (i, n)."""
    shard = parse_shard(args.shard)
    if args.ray_workers is not None and args.ray is None:
        raise InputError("--ray-workers needs --ray")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_chunking(args.chunk_tokens, args.overlap)
    return shard


def quiet_progress_bars() -> None:
    """No model-loading or download bars (transformers and huggingface_hub read this flag when
    imported). Set through the environment, since importing transformers here would add ~2 s to
    every call, an instant error included; directly where transformers is already loaded."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
