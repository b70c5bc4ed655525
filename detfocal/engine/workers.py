"""``data.workers: auto``: DataLoader processes from the measured load and step times.

Loading in the training process costs its whole time on the wall clock: the step waits
while one core decodes and the others idle. A worker process overlaps loading with the
step, but it runs on the same cores the step's threads use, so it still costs about
``load / cores`` of wall time, plus the transfer of each batch between processes. Workers
therefore save ``load * (1 - 1/cores)`` per step: half the load time on 2 cores, nearly all
of it on 32. ``auto`` starts workers only when that saving is at least
:data:`MIN_SAVING` of the step, and then as many as keep a batch ready every step (with
headroom for slow images), at most one per spare core. On the demo with 2 cores loading is
a few percent of a step, so ``auto`` keeps 0 (figures on the docs' benchmarks page).
"""
from __future__ import annotations

import math
import os
import random
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

# Workers must save at least this share of a step to be worth their memory and start-up.
MIN_SAVING = 0.05
MAX_WORKERS = 8


def available_cores(local_world_size: int = 1) -> int:
    """CPU cores this process may use: its affinity mask shared among the processes of this node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(cores // max(local_world_size, 1), 1)


def choose_workers(load_seconds: float, step_seconds: float, cores: int) -> tuple[int, str]:
    """The worker count for a batch load time and step time, and why, in one line.

    Args:
        load_seconds: loading one batch in the training process (decode, transforms, collate).
        step_seconds: one step without loading (a training step, or an evaluation forward).
        cores: cores available to this process (:func:`available_cores`).

    Returns:
        ``(workers, reason)``.
    """
    saving = load_seconds * (1 - 1 / cores)
    share = saving / max(step_seconds + load_seconds, 1e-9)
    measured = (f"loading a batch takes {1000 * load_seconds:.0f} ms, a step {1000 * step_seconds:.0f} ms, "
                f"{cores} core{'s' if cores != 1 else ''}")
    if cores < 2 or share < MIN_SAVING:
        return 0, f"data.workers: auto chose 0 ({measured}: workers would save {100 * share:.0f}% of a step)"
    # Each worker delivers a batch per load time; keep 2x what the steps consume for slow images.
    workers = min(max(math.ceil(2 * load_seconds / max(step_seconds, 1e-9)), 1), cores - 1, MAX_WORKERS)
    return workers, f"data.workers: auto chose {workers} ({measured}: workers save {100 * share:.0f}% of a step)"


def time_batch_load(dataset: Any, batch_size: int, collate_fn: Callable[[list[Any]], Any]) -> tuple[float, Any]:
    """Seconds to load the first ``batch_size`` items and collate them, and that batch.

    Random augmentations draw from Python's, NumPy's and torch's generators; their states are
    restored afterwards, so measuring does not change what training sees.
    """
    indices = range(min(batch_size, len(dataset)))
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        start = time.perf_counter()
        batch = collate_fn([dataset[i] for i in indices])
        return time.perf_counter() - start, batch
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def time_step(model: torch.nn.Module, images: Sequence[torch.Tensor], *, amp_dtype: torch.dtype | None,
              backward_factor: float) -> float:
    """Seconds of a step on ``images``, estimated without changing the model.

    An inference forward (eval mode, no gradient: BatchNorm statistics stay as they are) is
    timed on its second run, and scaled by ``backward_factor`` (3 for a training step,
    whose backward costs about twice the forward; 1 for evaluation).
    """
    was_training = model.training
    model.eval()
    device_type = images[0].device.type
    try:
        with torch.no_grad(), torch.autocast(device_type, dtype=amp_dtype or torch.float32,
                                             enabled=amp_dtype is not None):
            model(list(images))  # first run: kernel selection and allocation
            if device_type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(list(images))
            if device_type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - start) * backward_factor
    finally:
        model.train(was_training)


def resolve_workers(setting: int | str, dataset: Any, batch_size: int, collate_fn: Callable[[list[Any]], Any],
                    model: torch.nn.Module, device: torch.device, *, amp_dtype: torch.dtype | None = None,
                    training: bool = True, local_world_size: int = 1,
                    deterministic: bool = False) -> tuple[int, str | None]:
    """``data.workers`` as a number: itself, or for "auto" the measured choice of :func:`choose_workers`.

    With ``deterministic`` (``train.deterministic``), "auto" is 0 without measuring: with
    workers the augmentations draw from per-worker generators, so a choice that depends on
    a timing would make the same seed train on other images from one run to the next.

    Returns:
        ``(workers, reason)``: reason is None for a number, else one line for the log.
    """
    if setting != "auto":
        return int(setting), None
    if deterministic:
        return 0, "data.workers: auto chose 0 (train.deterministic: the augmentations must not depend on a timing)"
    if len(dataset) == 0:
        return 0, "data.workers: auto chose 0 (no images)"
    load_seconds, (images, _) = time_batch_load(dataset, batch_size, collate_fn)
    images = [image.to(device) for image in images]
    step_seconds = time_step(model, images, amp_dtype=amp_dtype, backward_factor=3.0 if training else 1.0)
    return choose_workers(load_seconds, step_seconds, available_cores(local_world_size))
