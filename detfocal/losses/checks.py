"""Argument checks shared by every loss: each error names the argument, the value and what was expected."""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

AlphaLike = Union[float, Sequence[float], Tensor, None]
REDUCTIONS = ("none", "mean", "sum")
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_values(values: Tensor, bad: Tensor, name: str, expected: str) -> None:
    """Raise ``ValueError("{name} holds {first bad value}, expected {expected}")`` where ``bad`` is True.

    Reading values back is free on CPU. On CUDA it would stall the stream once per call,
    so there it is an asynchronous device-side assert that fires at the next sync instead.
    """
    if bad.numel() == 0:
        return
    if bad.device.type == "cpu":
        if bool(bad.any()):
            raise ValueError(f"{name} holds {values[bad][0].item()}, expected {expected}")
    else:
        torch._assert_async(~bad.any(), f"{name} holds a value out of range, expected {expected}")


def check_unit_interval(values: Tensor, name: str) -> None:
    bad = ~((values >= 0) & (values <= 1))  # written so that NaN counts as bad
    check_values(values, bad, name, "values in [0, 1]")


def check_real(value: float, name: str, *, positive: bool = False) -> float:
    value = float(value)
    ok = value > 0 if positive else value >= 0  # comparisons with NaN are False: NaN is rejected
    if not (ok and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite real number {'> 0' if positive else '>= 0'}, got {value}")
    return value


def check_eps(eps: float) -> float:
    eps = float(eps)
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    return eps


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

    The value check is ``check_values``: immediate on CPU, an asynchronous assert on CUDA.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{name} with integer dtype must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
            f"got {tuple(labels.shape)}")
    num_classes = logits.shape[-1]
    high = num_classes if background_ok else num_classes - 1
    bad = ((labels < 0) | (labels > high)) & (labels != ignore_index)
    check_values(labels, bad, name, f"labels in [0, {high}]{' (C = background)' if background_ok else ''} "
                                    f"or ignore_index={ignore_index}")


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
    check_unit_interval(tensor, "alpha")
    return shaped
