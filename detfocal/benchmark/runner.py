"""Running the benchmark's cases: each batch of cases in a fresh interpreter, one result line per case.

The parent (:func:`run_cases`) starts ``python -m detfocal.benchmark --worker SPECS``; the child
(:func:`worker`) sends a progress line when a case starts and a result line (JSON) when it
ends, so the parent keeps what finished if a later case crashes or times out.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

__all__ = ["PROGRESS", "RESULT", "run_cases", "spec_label", "worker"]

logger = logging.getLogger(__name__)

# The prefixes of the worker's lines on its stdout; any other line (a log record) is not read.
PROGRESS = "detfocal.benchmark.progress "
RESULT = "detfocal.benchmark.result "


def spec_label(name: str, spec: dict[str, Any]) -> str:
    """``"loss: detfocal_head"``-style name of a case for the progress lines."""
    return f"{name}: " + " ".join(str(spec[key]) for key in ("impl", "label", "model", "backbone", "precision",
                                                             "dtype") if spec.get(key))


def worker(specs: list[dict[str, Any]], send: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run cases in this process (the subprocess side of :func:`run_cases`), one result each.

    A case that raises gives ``{"error": ...}`` and the next one still runs; the environment
    a case changes (the loss cases set ``DETFOCAL_COMPILE``) is restored after it.

    Args:
        specs: the cases, each with ``kind`` (loss, train, eval, inference, profile) and ``case``.
        send: called with the progress line (``PROGRESS`` + label) before each case and the
            result line (``RESULT`` + JSON) after it; the ``--worker`` command prints them.

    Returns:
        One result dict per spec.
    """
    import torch

    from .evaluation import eval_case, inference_case
    from .loss import loss_case
    from .profile import profile_case
    from .training import train_case

    cases = {"loss": loss_case, "train": train_case, "eval": eval_case, "inference": inference_case,
             "profile": profile_case}
    results = []
    for spec in specs:
        send(f"{PROGRESS}{spec_label(spec['case'], spec)}")
        torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
        environment = dict(os.environ)
        try:
            if spec["kind"] not in cases:
                raise ValueError(f"unknown case kind {spec['kind']!r}")
            result = cases[spec["kind"]](spec)
        except Exception as exc:  # noqa: BLE001 - reported in the case's table row
            result = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            os.environ.clear()
            os.environ.update(environment)
        send(f"{RESULT}{json.dumps(result)}")
        results.append(result)
    return results


def run_cases(specs: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    """Run ``specs`` in one fresh interpreter, logging a line per case with its seconds.

    Each case of a full run gets its own interpreter, so its peak memory is its own; ``--quick``
    runs its loss cases in one and the others in another, to pay the torch import twice
    instead of once per case.

    Args:
        specs: the cases (see :func:`worker`).
        timeout: seconds allowed per case; the interpreter is killed after ``timeout * len(specs)``.

    Returns:
        Each spec merged with its result; a case that did not finish has ``error`` (the
        child's last stderr line, or the timeout).
    """
    # For the loss's memory figures, a fixed mmap threshold makes glibc return every large free
    # to the OS at once, so the sampled RSS follows live tensor memory instead of the
    # allocator's cache. The other cases run with the allocator a training run has.
    env = dict(os.environ)
    if all(spec["kind"] == "loss" for spec in specs):
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "detfocal.benchmark", "--worker", json.dumps(specs)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout * len(specs), kill)
        timer.start()
        running, start = None, time.perf_counter()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(PROGRESS):
                    running, start = line[len(PROGRESS):].strip(), time.perf_counter()
                    logger.info("  running %s", running)
                elif line.startswith(RESULT):
                    results.append(json.loads(line[len(RESULT):]))
                    logger.info("  %s: %.0f s", running, time.perf_counter() - start)
                    running = None
            proc.wait()
        finally:
            timer.cancel()
        if running is not None:
            logger.info("  %s: failed", running)
        if len(results) < len(specs):
            stderr.seek(0)
            tail = (stderr.read().strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            error = f"timed out after {timeout * len(specs):.0f} s" if timed_out.is_set() else tail
            results += [{"error": error}] * (len(specs) - len(results))
    return [{**spec, **result} for spec, result in zip(specs, results)]
