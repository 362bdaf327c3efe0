"""Measuring tools shared by evaluation and benchmarks: the machine, peak memory, timing, tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch


def machine_info() -> dict:
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __init__(self, interval: float = 0.02) -> None:
        import threading

        import psutil

        self._proc, self._interval, self._stop = psutil.Process(), interval, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak_bytes = 0

    def _sample(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
