"""Argument checks shared by every loss: each error names the argument, the value and what was expected."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

AlphaLike = Union[float, Sequence[float], Tensor, None]
REDUCTIONS = ("none", "mean", "sum")


def check_logits(logits: Tensor, name: str = "logits") -> None:
    if not isinstance(logits, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got dtype {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have a class dimension [..., C], got a 0-d tensor")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_gamma(gamma: float, name: str = "gamma") -> float:
    gamma = float(gamma)
    if not gamma >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be a real number >= 0, got {gamma}")
    return gamma


def check_smoothing(label_smoothing: float) -> float:
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return label_smoothing


def compute_dtype(logits: Tensor) -> torch.dtype:
    """The dtype the math runs in: fp64 stays fp64, everything else is computed in fp32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def check_int_labels(labels: Tensor, logits: Tensor, ignore_index: int, name: str = "targets", *,
                     background_ok: bool = True) -> None:
    """Integer class indices of shape ``logits.shape[:-1]`` in [0, C] (C only if ``background_ok``) or ignore_index.

    The value check reads the labels back, which is free on CPU. On CUDA it would be a
    host sync per call, so there it is an asynchronous device-side assert instead.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{name} with integer dtype must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
            f"got {tuple(labels.shape)}")
    num_classes = logits.shape[-1]
    high = num_classes if background_ok else num_classes - 1
    bad = ((labels < 0) | (labels > high)) & (labels != ignore_index)
    if labels.device.type == "cpu":
        if bool(bad.any()):
            value = labels[bad][0].item()
            raise ValueError(
                f"{name} holds label {value}, expected values in [0, {high}]"
                f"{' (C = background)' if background_ok else ''} or ignore_index={ignore_index}")
    elif labels.numel() > 0:
        torch._assert_async(~bad.any(), f"{name} holds labels outside [0, {high}] other than ignore_index")


def alpha_tensor(alpha: AlphaLike, logits: Tensor, dtype: torch.dtype) -> Tensor | None:
    """Validate ``alpha`` and return it broadcastable to ``logits`` (None: no weighting).

    Accepted forms: a float in [0, 1]; -1 or None (no weighting); a length-C sequence or
    tensor (per class); a tensor of shape ``logits.shape[:-1]`` (per row) or anything
    else broadcastable to ``logits.shape``. A 1-d length-C tensor is read as per class;
    pass ``alpha[..., None]`` to force per-row on square ``[C, C]`` inputs.
    """
    if alpha is None:
        return None
    if isinstance(alpha, (int, float)):
        alpha = float(alpha)
        if alpha == -1.0:
            return None
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], or -1/None for no weighting, got {alpha}")
        return torch.tensor(alpha, dtype=dtype, device=logits.device)
    tensor = torch.as_tensor(alpha, dtype=dtype, device=logits.device)
    num_classes = logits.shape[-1]
    if tensor.dim() == 1 and tensor.shape[0] == num_classes:
        shaped = tensor
    elif tensor.dim() >= 1 and tensor.shape == logits.shape[:-1]:
        shaped = tensor.unsqueeze(-1)
    else:
        try:
            torch.broadcast_shapes(tensor.shape, logits.shape)
        except RuntimeError:
            raise ValueError(
                f"alpha as a tensor must have length C = {num_classes} (per class), shape "
                f"{tuple(logits.shape[:-1])} (per row) or broadcast to {tuple(logits.shape)}, "
                f"got shape {tuple(tensor.shape)}") from None
        shaped = tensor
    if tensor.numel() and tensor.device.type == "cpu" and bool(((tensor < 0) | (tensor > 1)).any()):
        raise ValueError(f"alpha values must lie in [0, 1], got min {tensor.min().item()} max {tensor.max().item()}")
    return shaped
