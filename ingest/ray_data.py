"""Embedding and compression on Ray Data: actors (on GPUs where the cluster has them) turn the
pending passages into dense vectors and latents; the calling process writes them.

Everything else is the ordinary ingestion (``Ingestor``): the same chunking, deterministic point
ids, change detection, bad-file report and retirement of stale chunks, so a Ray run and a CLI run
of the same files build the same collection, and either one finishes what the other left.

Why the writes stay in the driver: the embedded store is one process's directory, and a Qdrant
cluster takes batched upserts from one client faster than the encoders produce them. When a worker
dies, Ray Data restarts its actor and retries its batches (its defaults for actor pools); a run
killed outright is simply run again: written passages are found and skipped.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import numpy as np
import torch

from lclm_rag.errors import InputError
from lclm_rag.store import StoredPassage

logger = logging.getLogger(__name__)


class _EncodeBatch:
    """A Ray Data actor: one compressor and one embedder, loaded once, for every batch it is given."""

    def __init__(self, models_ref: list, threads: int, use_gpu: bool) -> None:
        import ray

        torch.set_num_threads(max(1, threads))
        self.compressor, self.embedder = ray.get(models_ref[0])  # the driver's own objects: the same fingerprint
        if use_gpu and torch.cuda.is_available():
            self.compressor.to("cuda")
            self.embedder.model.to("cuda")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        latents = self.compressor.compress(texts, batch_size=len(texts))
        # one object per passage (passages have different numbers of latents): the trailing None keeps
        # numpy from stacking equal-shaped arrays into one 3-d array, and is dropped again
        return {"index": batch["index"], "dense": self.embedder.embed(texts),
                "latents": np.array([lat.float().numpy() for lat in latents] + [None], dtype=object)[:-1]}


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """A cluster address that nothing answers at fails here at once; Ray itself keeps retrying for minutes."""
    if address is None or address == "auto":
        return  # a local cluster to start, or the one this machine's Ray knows about (Ray fails fast)
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"Ray address {address!r} must be 'auto', host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise InputError(f"no Ray cluster answers at {address}: {exc.strerror or exc}") from exc


class RayDataEncoder:
    """Runs the embedding and compression of an ingestion as a Ray Data ``map_batches`` over actors.

    ``address``: a running cluster (``"auto"``, ``"ray://host:10001"``, or a head's ``host:port``);
    None starts a local one on this machine. ``workers``: actors (default: one per GPU, else one
    per ``cpus_per_worker`` CPUs of the cluster). Call ``close()`` (or use ``with``) to shut a local
    cluster down.
    """

    def __init__(self, address: str | None = None, workers: int | None = None, cpus_per_worker: int = 1,
                 gpus_per_worker: float | None = None, batch_size: int = 32, progress: bool = False) -> None:
        try:
            import ray
        except ImportError as exc:
            raise InputError("ingestion on Ray needs Ray Data: pip install 'lclm-rag[ray]'") from exc
        if workers is not None and workers < 1:
            raise InputError(f"workers must be >= 1, got {workers}")
        if cpus_per_worker < 1:
            raise InputError(f"cpus_per_worker must be >= 1, got {cpus_per_worker}")
        _check_reachable(address)
        self._started = not ray.is_initialized()
        if self._started:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise InputError(f"cannot reach the Ray cluster at {address!r}: {exc}") from exc
        resources = ray.cluster_resources()
        cluster_gpus = int(resources.get("GPU", 0))
        self.gpus_per_worker = (1.0 if cluster_gpus else 0.0) if gpus_per_worker is None else gpus_per_worker
        if self.gpus_per_worker and not cluster_gpus:
            raise InputError(f"gpus_per_worker={self.gpus_per_worker:g} but the Ray cluster has no GPU")
        default = cluster_gpus if self.gpus_per_worker else max(1, int(resources.get("CPU", 1)) // cpus_per_worker)
        self.workers = workers or max(1, default)
        self.cpus_per_worker, self.batch_size, self.progress = cpus_per_worker, batch_size, progress

    def encode(self, pending: list[StoredPassage], compressor, embedder) -> Iterator[list[StoredPassage]]:
        """Batches of ``pending`` with ``dense`` and ``latents`` set, in the order they finish."""
        if not pending:
            return
        import ray
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = self.progress
        if not self.progress:
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        # the models go to the object store once; wrapped in a list, the reference reaches each actor
        # unresolved and stays alive in this process for restarted actors
        models = [ray.put((compressor, embedder))]
        batches = -(-len(pending) // self.batch_size)
        rows = ray.data.from_items([{"index": i, "text": p.text} for i, p in enumerate(pending)],
                                   override_num_blocks=max(self.workers, min(batches, 64 * self.workers)))
        encoded = rows.map_batches(
            _EncodeBatch, fn_constructor_args=(models, self.cpus_per_worker, bool(self.gpus_per_worker)),
            batch_size=self.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker or None,
        )
        for out in encoded.iter_batches(batch_size=self.batch_size, batch_format="numpy"):
            batch = []
            for index, dense, latents in zip(out["index"], out["dense"], out["latents"], strict=True):
                passage = pending[int(index)]
                passage.dense = np.array(dense, dtype=np.float32)
                passage.latents = torch.tensor(np.asarray(latents), dtype=torch.float32)
                batch.append(passage)
            yield batch

    def close(self) -> None:
        import ray

        if self._started and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "RayDataEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
