"""Argument checks and the label convention shared by every loss and head.

Each error names the argument, the value and what was expected:
``ValueError("gamma holds inf, expected a finite real >= 0")``.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Sequence, Union

import torch
from torch import Tensor

from detfocal.utils._compat import assert_async

AlphaLike = Union[float, Sequence[float], Tensor, None]
REDUCTIONS = ("none", "mean", "sum")
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
ALPHA_EXPECTED = "a real in [0, 1], -1/None, or per-class/per-row weights"


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
        assert_async(~bad.any(), f"{name} holds a value out of range, expected {expected}")


def check_unit_interval(values: Tensor, name: str) -> None:
    """Values in [0, 1], NaN rejected, from one fused min/max pass (no mask is built unless one is bad)."""
    if values.numel() == 0:
        return
    low, high = torch.aminmax(values.detach())  # both NaN if any value is NaN
    ok = (low >= 0) & (high <= 1)
    if values.device.type != "cpu":
        assert_async(ok, f"{name} holds a value outside [0, 1] or NaN, expected values in [0, 1]")
    elif not bool(ok):
        check_values(values, ~((values >= 0) & (values <= 1)), name, "values in [0, 1]")


def check_real(value: object, name: str, *, low: float = 0.0, high: float = math.inf, low_open: bool = False,
               high_open: bool = False) -> float:
    """A finite real in [low, high] (an end is open where ``*_open``); returns it as a float.

    Raises:
        ValueError: a non-real (a string, a tensor, None), NaN, inf or a value out of range.
    """
    if isinstance(value, Tensor) and value.numel() == 1 and not value.requires_grad:
        value = value.item()
    if not isinstance(value, Real):
        raise ValueError(f"{name} holds {value!r} ({type(value).__name__}), expected a real number")
    number = float(value)
    low_ok = number > low if low_open else number >= low
    high_ok = number < high if high_open else number <= high
    if not (math.isfinite(number) and low_ok and high_ok):  # comparisons with NaN are False
        if high == math.inf and low == -math.inf:
            expected = "a finite real"
        elif high == math.inf:
            expected = f"a finite real {'>' if low_open else '>='} {low:g}"
        else:
            expected = f"a finite real in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} holds {number}, expected {expected}")
    return number


def check_gamma(gamma: object, name: str = "gamma") -> float:
    """A focusing exponent: a finite real >= 0."""
    return check_real(gamma, name)


def check_eps(eps: object) -> float:
    return check_real(eps, "eps", high=0.5, low_open=True, high_open=True)


def check_smoothing(label_smoothing: object) -> float:
    return check_real(label_smoothing, "label_smoothing", high=1.0)


def check_alpha(alpha: object) -> float | None:
    """A scalar focal alpha: a real in [0, 1], or -1/None for no weighting (returned as None)."""
    if alpha is None or (isinstance(alpha, Real) and not isinstance(alpha, bool) and float(alpha) == -1.0):
        return None
    if not isinstance(alpha, Real) or isinstance(alpha, bool):
        raise ValueError(f"alpha holds {alpha!r} ({type(alpha).__name__}), expected {ALPHA_EXPECTED}")
    value = float(alpha)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"alpha holds {value}, expected {ALPHA_EXPECTED}")
    return value


def check_no_grad(value: object, name: str, function: str) -> None:
    """Refuse a tensor that requires grad where ``function`` does not backpropagate into it."""
    if isinstance(value, Tensor) and value.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad, expected a tensor without gradient: {function} does not "
                         f"backpropagate into {name} (pass {name}.detach())")


def compute_dtype(like: Tensor | torch.dtype) -> torch.dtype:
    """The dtype the math runs in: fp64 stays fp64, everything else is computed in fp32."""
    dtype = like if isinstance(like, torch.dtype) else like.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_logits(logits: Tensor, name: str = "logits") -> None:
    if not isinstance(logits, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got dtype {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have a class dimension [..., C], got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} holds 0 classes (shape {tuple(logits.shape)}), expected a class dimension C >= 1")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_int_labels(labels: Tensor, logits: Tensor, ignore_index: int, name: str = "targets", *,
                     background_ok: bool = True) -> Tensor:
    """Integer class indices of shape ``logits.shape[:-1]`` in [0, C] (C only if ``background_ok``) or ignore_index.

    Values are compared as int64, so an unsigned 255 is 255 (not ``ignore_index=-1``).
    The value check is ``check_values``: immediate on CPU, an asynchronous assert on CUDA.

    Returns:
        The labels as int64.
    """
    if labels.dtype not in INT_DTYPES:
        raise ValueError(f"{name} must be an integer tensor of shape {tuple(logits.shape[:-1])}, got dtype "
                         f"{labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{name} with integer dtype must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
            f"got {tuple(labels.shape)}")
    labels = labels.long()
    num_classes = logits.shape[-1]
    high = num_classes if background_ok else num_classes - 1
    bad = ((labels < 0) | (labels > high)) & (labels != ignore_index)
    check_values(labels, bad, name, f"labels in [0, {high}]{' (C = background)' if background_ok else ''} "
                                    f"or ignore_index={ignore_index}")
    return labels


def foreground_mask(labels: Tensor, num_classes: int, ignore_index: int | None = None) -> Tensor:
    """Where ``labels`` (int64) name a foreground class: in [0, num_classes) and not ``ignore_index``."""
    foreground = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        foreground &= labels != ignore_index
    return foreground


def alpha_tensor(alpha: AlphaLike, logits: Tensor, dtype: torch.dtype) -> Tensor | None:
    """Validate ``alpha`` and return it broadcastable to ``logits`` (None: no weighting).

    Accepted forms: a float in [0, 1]; -1 or None (no weighting); a length-C sequence or
    tensor (per class); a tensor of shape ``logits.shape[:-1]`` (per row) or anything
    else broadcastable to ``logits.shape``. A 1-d length-C tensor is read as per class;
    pass ``alpha[..., None]`` to force per-row on square ``[C, C]`` inputs. A tensor that
    requires grad keeps its graph.
    """
    if alpha is None or isinstance(alpha, (Real, str, bytes)):
        value = check_alpha(alpha)
        # torch.full, not torch.tensor: a tensor made on the device, not copied from the host,
        # which on CUDA would wait for the stream.
        return None if value is None else torch.full((), value, dtype=dtype, device=logits.device)
    try:
        tensor = torch.as_tensor(alpha, dtype=dtype, device=logits.device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"alpha holds {alpha!r} ({type(alpha).__name__}), expected {ALPHA_EXPECTED}") from None
    num_classes = logits.shape[-1]
    if tensor.dim() == 1 and tensor.shape[0] == num_classes:
        shaped = tensor
    elif tensor.dim() >= 1 and tensor.shape == logits.shape[:-1]:
        shaped = tensor.unsqueeze(-1)
    else:
        try:
            broadcast = torch.broadcast_shapes(tensor.shape, logits.shape)
        except RuntimeError:
            broadcast = None
        # An alpha that broadcasts to a larger shape would enlarge the loss (and its sum).
        if broadcast != logits.shape:
            raise ValueError(
                f"alpha as a tensor must have length C = {num_classes} (per class), shape "
                f"{tuple(logits.shape[:-1])} (per row) or broadcast to the logits' shape {tuple(logits.shape)} "
                f"without enlarging it, got alpha of shape {tuple(tensor.shape)}")
        shaped = tensor
    check_unit_interval(tensor, "alpha")
    return shaped


def normalizer_tensor(normalizer: Tensor | float | None, reduction: str, logits: Tensor,
                      dtype: torch.dtype) -> Tensor | None:
    """Validate a loss normaliser and return it as a 0-d ``dtype`` tensor on the logits' device.

    A finite real > 0, or a one-element tensor read without gradient. A tensor's value is
    checked where it lives on the CPU; on an accelerator reading it would stall the device.

    Raises:
        ValueError: reduction "none", a tensor of more than one element, or a value that
            is not a finite real > 0.
    """
    if normalizer is None:
        return None
    if reduction == "none":
        raise ValueError("normalizer divides a reduced loss, got reduction='none'; use 'sum' or 'mean'")
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1 or normalizer.is_complex():
            raise ValueError(f"normalizer must be a number or a one-element real tensor, got a {normalizer.dtype} "
                             f"tensor of shape {tuple(normalizer.shape)}")
        check_no_grad(normalizer, "normalizer", "sigmoid_focal_loss")
        tensor = normalizer.detach().reshape(()).to(dtype)
    else:
        check_real(normalizer, "normalizer", low=0.0, low_open=True)
        tensor = torch.tensor(float(normalizer), dtype=dtype)
    # Checked in the compute dtype, where a tiny or huge number may have become 0 or inf.
    if tensor.device.type == "cpu":
        check_real(tensor, "normalizer" + (f" (as {dtype})" if not isinstance(normalizer, Tensor) or
                                           normalizer.dtype != dtype else ""), low=0.0, low_open=True)
    if not isinstance(normalizer, Tensor):  # made on the device: a copy from the host would wait for the stream
        return torch.full((), float(normalizer), dtype=dtype, device=logits.device)
    return tensor.to(logits.device)
