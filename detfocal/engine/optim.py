"""Optimizer and per-iteration learning-rate schedule (linear warmup, then step or cosine)."""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from detfocal.utils._compat import foreach_copy_, foreach_lerp_


def build_optimizer(model: nn.Module, *, name: str, lr: float, momentum: float = 0.9,
                    weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over the trainable parameters.

    Biases and normalisation weights (every parameter with fewer than 2 dimensions) get no
    weight decay: decaying a GroupNorm scale towards 0 only fights the normalisation.

    Args:
        model: the detector (not DDP-wrapped is fine, the parameters are the same).
        name: "sgd" or "adamw".
        lr: base learning rate.
        momentum: SGD momentum, or AdamW's beta1.
        weight_decay: decay of the weight matrices and conv kernels.

    Returns:
        The optimizer, with two parameter groups (decayed, not decayed).

    Raises:
        ValueError: an unknown ``name``.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused (single-kernel) implementations: one pass over the parameters instead of one per
    # op (timings on the docs' benchmarks page); they need floating CPU/CUDA tensors.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), fused=fused)
    raise ValueError(f"train.optimizer: expected 'sgd' or 'adamw', got {name!r}")


def lr_factor(iteration: int, *, warmup_iters: int, warmup_factor: float, schedule: str,
              steps: Sequence[int] = (), gamma: float = 0.1, total_iters: int | None = None,
              min_lr_factor: float = 0.0) -> float:
    """The multiplier of the base lr at ``iteration`` (0-based, counted over the whole run).

    Linear warmup from ``warmup_factor`` to 1 over ``warmup_iters`` (Goyal et al. 2017), times
    either a step decay (x ``gamma`` at each of ``steps``, as in the paper's 1x schedule) or a
    cosine from 1 to ``min_lr_factor`` over ``total_iters``.

    Raises:
        ValueError: an unknown schedule, or cosine without ``total_iters``.
    """
    warmup = 1.0
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        warmup = warmup_factor * (1 - alpha) + alpha
    if schedule == "step":
        return warmup * gamma ** sum(iteration >= step for step in steps)
    if schedule == "cosine":
        if not total_iters:
            raise ValueError("train.schedule: cosine needs the total number of iterations")
        progress = min(iteration / total_iters, 1.0)
        return warmup * (min_lr_factor + (1 - min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"train.schedule.type: expected 'step' or 'cosine', got {schedule!r}")


def build_lr_schedule(*, warmup_iters: int, warmup_factor: float, schedule: str, steps: Sequence[int] = (),
                      gamma: float = 0.1, total_iters: int | None = None,
                      min_lr_factor: float = 0.0) -> Callable[[int], float]:
    """The lr multiplier as a function of the global iteration (:func:`lr_factor` with these arguments).

    The loop sets ``lr = base_lr * schedule(iteration)`` before every step, so the schedule has
    no state: a resumed run only needs its iteration count.

    Raises:
        ValueError: as :func:`lr_factor`, now rather than mid-run.
    """
    schedule_fn = partial(lr_factor, warmup_iters=warmup_iters, warmup_factor=warmup_factor, schedule=schedule,
                          steps=tuple(steps), gamma=gamma, total_iters=total_iters, min_lr_factor=min_lr_factor)
    schedule_fn(0)
    return schedule_fn


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate to ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_ema(model: nn.Module, *, decay: float, warmup_iters: int) -> AveragedModel:
    """An exponential moving average of ``model``'s weights and buffers (timm's and ultralytics' EMA).

    Built on ``torch.optim.swa_utils.AveragedModel``; its ``module`` is the averaged model. The decay ramps up as
    ``decay * (1 - exp(-updates / warmup_iters))``, so the early, fast-changing weights are not
    averaged in for thousands of steps; integer buffers (BatchNorm's step count) are copied.
    Call ``ema.update_parameters(model)`` after every optimizer step.

    Args:
        model: the model being trained (not DDP-wrapped).
        decay: the final decay, in (0, 1).
        warmup_iters: the ramp's time constant in updates; 0 uses ``decay`` from the start.
    """

    def average(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():
            foreach_copy_(averaged, current)
            return
        updates = float(num_averaged)
        ramp = 1.0 - math.exp(-updates / warmup_iters) if warmup_iters else 1.0
        foreach_lerp_(averaged, current, 1.0 - decay * ramp)

    return AveragedModel(model, multi_avg_fn=average, use_buffers=True)
