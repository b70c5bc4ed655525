"""The training loop and its parts: precision choice, optimizer, lr schedule, one epoch, evaluation.

``tools/train.py`` calls these top to bottom; there is no Trainer class and no hook. Every
function takes plain arguments (no config object), so each can be used and tested alone.
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from detfocal.engine.distributed import all_reduce_sum, get_world_size
from detfocal.evaluation.coco import STAT_NAMES


# ----------------------------------------------------------------------------------------------
# Training and evaluation


def _to_device(images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, Any]], device: torch.device) -> tuple[list, list]:
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets


def _mean_over_ranks(loss_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The losses (and their total) averaged over processes, as Python floats, for logging."""
    names = list(loss_dict)
    values = torch.stack([loss_dict[name].detach().float() for name in names])
    values = torch.cat([values, values.sum().reshape(1)])
    values = all_reduce_sum(values) / get_world_size()
    return dict(zip(names + ["loss"], values.tolist()))


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    loader: Iterable, device: torch.device, epoch: int, *,
                    scaler: torch.amp.GradScaler | None = None, amp_dtype: torch.dtype | None = None,
                    grad_clip: float | None = None, log_interval: int = 20,
                    metrics_writer: Callable[[dict[str, Any]], None] | None = None, is_main: bool = True,
                    max_iters: int | None = None) -> dict[str, float]:
    """Train for one pass over ``loader`` (or until ``max_iters`` iterations in all).

    The global step is ``scheduler.last_epoch`` (iterations since the start of the run), so a
    resumed run continues the count. A step is logged (progress bar and ``metrics_writer``) at
    the first iteration of the epoch and every ``log_interval`` steps; logged losses are averaged
    over processes.

    Args:
        model: the detector in train mode returns ``{"classification", "bbox_regression"}``;
            DDP-wrapped under torchrun.
        optimizer, scheduler: from ``build_optimizer`` / ``build_scheduler``.
        loader: yields ``(images, targets)`` lists (``collate_fn``).
        device: where the batch goes.
        epoch: 0-based epoch number, for the logs.
        scaler: a GradScaler for fp16, else None.
        amp_dtype: the autocast dtype, or None for fp32.
        grad_clip: max total gradient norm, or None.
        log_interval: steps between logged lines.
        metrics_writer: called with each logged record (a JSON-able dict); None on other ranks.
        is_main: show the progress bar (rank 0 only).
        max_iters: stop once the global step reaches it.

    Returns:
        ``{"loss", "classification", "bbox_regression": epoch means, "iters": steps done this
        epoch, "global_step", "images_per_s", "seconds"}``.

    Raises:
        FloatingPointError: a loss is not finite. Its message is one line with the losses; the
            optimizer has not stepped on that batch, so the last checkpoint stays the last good one.
    """
    model.train()
    world_size = get_world_size()
    sums: dict[str, float] = defaultdict(float)
    iters = images_seen = 0
    start = time.perf_counter()
    progress = tqdm(loader, desc=f"epoch {epoch}", disable=not is_main, dynamic_ncols=True, leave=False)
    for images, targets in progress:
        if max_iters is not None and scheduler.last_epoch >= max_iters:
            break
        images, targets = _to_device(images, targets, device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        logged = _mean_over_ranks(loss_dict)  # synchronises, so every rank sees the same verdict
        if not all(math.isfinite(value) for value in logged.values()):
            losses = ", ".join(f"{name}={value:.6g}" for name, value in logged.items())
            raise FloatingPointError(f"non-finite loss at epoch {epoch}, step {scheduler.last_epoch + 1}: {losses}")

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]  # the lr this step used
        scheduler.step()

        iters += 1
        images_seen += len(images) * world_size
        for name, value in logged.items():
            sums[name] += value
        step = scheduler.last_epoch
        if iters == 1 or step % log_interval == 0:
            images_per_s = images_seen / max(time.perf_counter() - start, 1e-9)
            record = {"type": "train", "epoch": epoch, "step": step, "lr": lr, **logged, "images_per_s": images_per_s}
            if metrics_writer is not None:
                metrics_writer(record)
            progress.set_postfix({**{k.split("_")[0][:5]: f"{v:.3f}" for k, v in logged.items()},
                                  "lr": f"{lr:.2e}", "img/s": f"{images_per_s:.1f}"}, refresh=False)
    progress.close()
    elapsed = time.perf_counter() - start
    means = {name: total / max(iters, 1) for name, total in sums.items()}
    return {**means, "iters": iters, "global_step": scheduler.last_epoch,
            "images_per_s": images_seen / max(elapsed, 1e-9), "seconds": elapsed}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, evaluator: Any, device: torch.device,
             amp_dtype: torch.dtype | None = None, *, is_main: bool = True) -> dict[str, Any]:
    """Run the detector over ``loader``, gather predictions across processes and summarize.

    Args:
        model: the detector, not DDP-wrapped (inference needs no gradient sync).
        loader: yields ``(images, targets)``; each rank sees its own share of the images.
        evaluator: a ``CocoEvaluator`` (``update``, ``synchronize``, ``summarize``).
        device: where the images go.
        amp_dtype: autocast dtype for the forward pass, or None.
        is_main: rank 0 summarizes and shows the progress bar.

    Returns:
        On the main process, ``evaluator.summarize()``: the 12 COCO stats and ``per_class``;
        ``{}`` on the other ranks.
    """
    was_training = model.training
    model.eval()
    for images, targets in tqdm(loader, desc="eval", disable=not is_main, dynamic_ncols=True, leave=False):
        images = [image.to(device, non_blocking=True) for image in images]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(images)
        evaluator.update({target["image_id"]: {k: v.float().cpu() for k, v in output.items()}
                          for target, output in zip(targets, outputs)})
    evaluator.synchronize()  # a collective: every rank must reach it
    model.train(was_training)
    return evaluator.summarize() if is_main else {}
