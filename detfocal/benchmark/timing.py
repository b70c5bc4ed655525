"""Timing and memory measurement shared by the benchmark's cases."""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import threading
import time
from typing import Any, Callable, ContextManager, Iterator

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


def around_module(module: Any, context: Callable[[], ContextManager[Any]]) -> None:
    """Run every forward of ``module`` inside a fresh ``context()`` (forward hooks, from outside the library)."""
    open_contexts: list[ContextManager[Any]] = []

    def enter(*_: Any) -> None:
        open_contexts.append(context())
        open_contexts[-1].__enter__()

    def leave(*_: Any) -> None:
        open_contexts.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def around_method(owner: Any, name: str, context: Callable[[], ContextManager[Any]]) -> None:
    """Shadow ``owner.name`` with an instance attribute running it inside ``context()``; no-op if it has none."""
    method = getattr(owner, name, None)
    if method is None:
        return

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with context():
            return method(*args, **kwargs)

    setattr(owner, name, wrapped)


@contextlib.contextmanager
def add_seconds(totals: dict[str, float], label: str) -> Iterator[None]:
    """Add the wall time of the ``with`` body to ``totals[label]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        totals[label] = totals.get(label, 0.0) + time.perf_counter() - start
