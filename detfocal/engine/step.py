"""One training step: forward, backward, the step's single host sync, and the optimizer step."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from detfocal.utils.comm import all_reduce_sum, get_world_size

__all__ = ["documented_sync", "train_step"]


def _first_nonfinite_parameter(model: nn.Module) -> str:
    for name, parameter in model.named_parameters():
        if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
            return name.removeprefix("module.")
    return "<none found>"


@contextlib.contextmanager
def documented_sync(device: torch.device) -> Iterator[None]:
    """Around the step's one host sync: CUDA's sync debug mode is off inside and restored after.

    Under ``torch.cuda.set_sync_debug_mode("error")`` a training step then fails at any other
    sync, not at this expected one (the CUDA test that runs steps so, and
    ``docs/how-to/gpu-check.md``).

    Args:
        device: the step's device; nothing changes off CUDA or with the debug mode off.
    """
    mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


def train_step(model: nn.Module, images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, Any]],
               optimizer: torch.optim.Optimizer, *, amp_dtype: torch.dtype | None,
               scaler: torch.amp.GradScaler | None, grad_clip: float | None,
               stop_requested: Callable[[], bool] = lambda: False, iteration: int = 0) -> dict[str, float]:
    """One forward, backward and (unless skipped) optimizer step, with one host sync.

    The losses, the gradient norm and the stop flag travel in a single all-reduce, which is
    also the step's only host sync: every rank sees the same verdict. The gradient norm is
    computed after unscaling (fp16) and reused for clipping. "Only" holds for detfocal's
    side of the step and a fused optimizer (:func:`~detfocal.engine.optim.build_optimizer`'s);
    ``GradScaler.step`` reads the inf check back for any other, and torchvision's parts of
    the model make their own (``docs/how-to/gpu-check.md`` lists them).

    Returns:
        The losses averaged over processes (``classification``, ``bbox_regression``, ``loss``),
        ``grad_norm``, ``skipped`` (1.0 when the GradScaler skipped the step, fp16 only) and
        ``stop`` (1.0 when ``stop_requested()`` was true on any rank at the sync).

    Raises:
        FloatingPointError: a non-finite loss, or (fp32/bf16) a non-finite gradient, naming the
            first such parameter and the step; the optimizer has not stepped.
    """
    device_type = images[0].device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss_dict = model(images, targets)
    loss = sum(loss_dict.values())
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)  # the norm and the clipping see the true gradients
    parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = (torch.nn.utils.get_total_norm([p.grad for p in parameters], foreach=True) if parameters
                 else torch.zeros((), device=loss.device))

    names = list(loss_dict)
    world_size = get_world_size()
    # torch.full, not torch.tensor: made on the device, where a copy from the host would wait for the stream.
    values = torch.stack([loss_dict[name].detach().float() for name in names] +
                         [loss.detach().float(), grad_norm.float(),
                          torch.full((), float(stop_requested()), device=loss.device)])
    # Means over ranks; the gradient norm is the same on every rank, and stop > 0 if any rank stops.
    with documented_sync(loss.device):
        values = (all_reduce_sum(values) / world_size).tolist()  # the step's one host sync
    logged = dict(zip(names + ["loss", "grad_norm", "stop"], values))
    if not all(math.isfinite(logged[name]) for name in names + ["loss"]):
        losses = ", ".join(f"{name}={logged[name]:.6g}" for name in names + ["loss"])
        raise FloatingPointError(f"non-finite loss at step {iteration + 1}: {losses}")
    finite_grads = math.isfinite(logged["grad_norm"])
    if not finite_grads and scaler is None:
        raise FloatingPointError(f"non-finite gradient at step {iteration + 1} in parameter "
                                 f"{_first_nonfinite_parameter(model)} (loss {logged['loss']:.6g}); no step was taken")
    if grad_clip is not None and finite_grads:
        torch.nn.utils.clip_grads_with_norm_(parameters, grad_clip, grad_norm, foreach=True)
    if scaler is not None:
        scaler.step(optimizer)  # skips the step itself when unscale_ found inf/NaN
        scaler.update()
    else:
        optimizer.step()
    logged["skipped"] = float(not finite_grads)
    return logged
