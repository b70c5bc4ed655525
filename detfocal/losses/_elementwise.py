"""What the elementwise focal-family losses share: dense targets, kept rows, reduction, alpha_t.

The losses of :mod:`.probs`, :mod:`.focal_star` and :mod:`.focal_cosine` are written with
softplus/clamps that autograd differentiates safely, so gradients also flow into float
targets and alpha tensors that require grad. These helpers keep them to the conventions
of :mod:`detfocal.losses.focal`: ``[..., C]`` inputs, integer labels with C = background,
ignored rows that reach neither the value nor the gradient, and "none"/"sum"/"mean".
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import checks

__all__ = ["alpha_weight", "dense_targets", "grad_floor", "reduce_elementwise", "select_kept_rows"]


def grad_floor(dtype: torch.dtype) -> float:
    """The smallest denominator d whose slope 1/d (times up to ~4) still fits ``dtype``.

    Gradients go back in the input's dtype. For fp16 (max 65504) this is about 6.1e-5, so
    a clamp at it keeps -log p's slope 1/p finite; for bf16/fp32/fp64 it is ~1e-38 or less
    and never binds.
    """
    return 4.0 / torch.finfo(dtype).max


def dense_targets(targets: Tensor, logits: Tensor, ignore_index: int, dtype: torch.dtype,
                   name: str = "targets") -> tuple[Tensor, Tensor | None]:
    """Targets as a float ``[..., C]`` tensor in ``dtype``, plus the mask of kept rows.

    Float targets (same shape as ``logits``, values in [0, 1]) are used as they are, with
    no mask. Integer labels of shape ``logits.shape[:-1]`` follow ``sigmoid_focal_loss``:
    c in [0, C) is class c, C is background (an all-zero row), ``ignore_index`` drops the row.
    """
    if not isinstance(targets, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.is_floating_point():
        if targets.shape != logits.shape:
            raise ValueError(
                f"{name} with a float dtype must have shape {tuple(logits.shape)}, got {tuple(targets.shape)}; "
                f"integer class labels take shape {tuple(logits.shape[:-1])}")
        checks.check_unit_interval(targets, name)
        return targets.to(dtype), None
    if targets.dtype not in checks.INT_DTYPES:
        raise ValueError(f"{name} must be a float tensor of shape {tuple(logits.shape)} or an integer tensor of "
                         f"shape {tuple(logits.shape[:-1])}, got dtype {targets.dtype}")
    labels = checks.check_int_labels(targets, logits, ignore_index, name)
    valid = labels != ignore_index
    is_pos = checks.foreground_mask(labels, logits.shape[-1], ignore_index)
    index = torch.where(is_pos, labels, torch.zeros_like(labels)).unsqueeze(-1)  # [...] -> [..., 1]
    dense = torch.zeros(logits.shape, dtype=dtype, device=logits.device)
    dense.scatter_(-1, index, is_pos.unsqueeze(-1).to(dtype))  # background and ignored rows stay 0
    return dense, valid


def select_kept_rows(x: Tensor, valid: Tensor | None) -> Tensor:
    """``x`` with its ignored rows set to 0.

    An ignored row may hold any logit, inf and NaN included (padding, masked anchors);
    zeroing its loss afterwards keeps the value finite but not the gradient (0 * inf is NaN).
    """
    return x if valid is None else torch.where(valid.unsqueeze(-1), x, 0)


def reduce_elementwise(loss: Tensor, valid: Tensor | None, reduction: str) -> Tensor:
    """Zero the ignored rows, then reduce; "mean" divides by the kept rows * C (as sigmoid_focal_loss)."""
    if valid is not None:
        # where, not multiply: an ignored row's value never reaches the result or the gradient.
        loss = torch.where(valid.unsqueeze(-1), loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    count = loss.numel() if valid is None else valid.sum() * loss.shape[-1]
    return loss.sum() / torch.as_tensor(count, dtype=loss.dtype, device=loss.device).clamp(min=1)


def alpha_weight(alpha: Tensor | None, t: Tensor) -> Tensor | float:
    """alpha_t = alpha t + (1 - alpha)(1 - t) (Lin et al. 2017, eq. 3, extended to soft t)."""
    return 1.0 if alpha is None else alpha * t + (1 - alpha) * (1 - t)
