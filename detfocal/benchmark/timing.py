"""Timing and memory measurement shared by the benchmark's cases."""
from __future__ import annotations

import math
import os
import statistics
import threading
import time
from typing import Any, Callable

class PeakRSS:
    """Samples this process's resident memory in a thread; ``extra_mb`` is the peak above the start."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def time_call(fn: Callable[[], Any], repeats: int, device: str) -> tuple[float, float, float]:
    """(first-call seconds, median ms, peak extra MB) of ``fn``."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with PeakRSS() as meter:
            fn()
        extra = meter.extra_mb
    return first, statistics.median(times) * 1000, extra


def fmt(value: float | None, pattern: str = "{:.1f}") -> str:
    """``value`` formatted, or "-" for a missing or NaN value."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)
