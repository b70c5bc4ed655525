"""Focal loss, BCE and NLL on probabilities: for heads that already output them (mmdet's ``activated=True``).

Prefer the losses on logits where you can (:func:`~detfocal.losses.sigmoid_focal_loss`,
``F.cross_entropy``): they need no clamp and are exact at any logit. Here ``probs`` are
clamped away from 0 and 1, so that the log and its slope stay finite.

Conventions follow :mod:`detfocal.losses.focal`: ``[..., C]`` inputs, math in fp32 (fp64
stays fp64), integer labels with C = background, "none"/"sum"/"mean" reductions, and
finite gradients at saturated inputs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import checks
from ._elementwise import alpha_weight, dense_targets, grad_floor, reduce_elementwise
from .checks import AlphaLike

__all__ = ["binary_cross_entropy_with_probs", "focal_loss_with_probs", "nll_loss_with_probs"]


def _clamped_probs(probs: Tensor, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """p and 1 - p, each clamped to [eps, 1 - eps] in ``dtype``.

    1 - p is taken from the unclamped p: it is exact for p >= 0.5 and stays >= eps even
    where 1 - eps rounds to 1 in fp32, so the log never sees 0.
    """
    eps = max(eps, grad_floor(probs.dtype))
    p = probs.to(dtype)
    return p.clamp(eps, 1 - eps), (1 - p).clamp(eps, 1 - eps)


def _check_probs(probs: Tensor) -> None:
    checks.check_logits(probs, "probs")
    checks.check_unit_interval(probs, "probs")


def focal_loss_with_probs(probs: Tensor, targets: Tensor, alpha: AlphaLike = 0.25, gamma: float = 2.0,
                          reduction: str = "none", eps: float = 1e-6, *, ignore_index: int = -1) -> Tensor:
    """Sigmoid focal loss on probabilities, -alpha_t (1 - p_t)^gamma log(p_t) (Lin et al. 2017, eq. 5).

    mmdet's ``FocalLoss(activated=True)``: for heads that already output sigmoid
    probabilities. Prefer :func:`~detfocal.losses.sigmoid_focal_loss` on logits where you
    can: it needs no clamp and is exact at any logit.

    Clamping: ``probs`` and ``1 - probs`` are clamped to [eps, 1 - eps] before the log and
    the focal weight, so probabilities of exactly 0 or 1 give the finite loss of eps or
    1 - eps, and a zero gradient (the clamp is flat there). For fp16 ``probs`` eps is raised
    to about 6.1e-5 so that the slope 1/p of -log p fits in fp16.

    Args:
        probs: probabilities in [0, 1], float ``[..., C]`` (fp16/bf16 computed in fp32).
        targets: float, same shape (0/1 or soft in [0, 1]), or integer labels
            ``probs.shape[:-1]`` as in ``sigmoid_focal_loss``: c in [0, C) is class c,
            C is background, ``ignore_index`` ignores the row.
        alpha: as in ``sigmoid_focal_loss``: float in [0, 1], -1/None, per class or per row.
        gamma: focusing parameter >= 0; gamma = 0 with alpha = None is ``F.binary_cross_entropy``.
        reduction: "none" (``[..., C]``, ignored rows 0), "sum", or "mean" over the
            non-ignored elements.
        eps: clamp, in (0, 0.5).
        ignore_index: integer label of rows to ignore.

    Returns:
        The loss in fp32 (fp64 for fp64 probs).

    Raises:
        ValueError: probs not floating or outside [0, 1], bad targets, alpha, gamma, eps or reduction.

    Example:
        >>> probs = torch.rand(4, 10, 3, requires_grad=True)
        >>> focal_loss_with_probs(probs, torch.randint(0, 4, (4, 10)), reduction="sum").backward()
    """
    _check_probs(probs)
    checks.check_reduction(reduction)
    gamma = checks.check_gamma(gamma)
    eps = checks.check_eps(eps)
    dtype = checks.compute_dtype(probs)
    alpha_t = checks.alpha_tensor(alpha, probs, dtype)
    t, valid = dense_targets(targets, probs, ignore_index, dtype)
    p, p_neg = _clamped_probs(probs, eps, dtype)
    ce = -(t * torch.log(p) + (1 - t) * torch.log(p_neg))
    # 1 - p_t >= eps after the clamp, so even gamma < 1 has a finite slope here.
    one_minus_pt = t * p_neg + (1 - t) * p
    loss = ce * one_minus_pt.pow(gamma) * alpha_weight(alpha_t, t)
    return reduce_elementwise(loss, valid, reduction)


def binary_cross_entropy_with_probs(probs: Tensor, targets: Tensor, reduction: str = "mean", eps: float = 1e-6,
                                    ignore_index: int = -1) -> Tensor:
    """Binary cross entropy on probabilities, -(t log p + (1 - t) log(1 - p)).

    ``F.binary_cross_entropy`` that also takes class indices and clamps instead of capping
    the log at -100. Same clamping as :func:`focal_loss_with_probs`, of which this is the
    gamma = 0, alpha = None case.

    Args:
        probs: probabilities in [0, 1], float ``[..., C]``.
        targets: float one-hot/soft targets of the same shape, or integer labels
            ``probs.shape[:-1]`` (c in [0, C) class c, C background, ``ignore_index`` ignored).
        reduction: "none", "sum" or "mean" (over the non-ignored elements).
        eps: clamp of probs and 1 - probs, in (0, 0.5).
        ignore_index: integer label of rows to ignore.

    Returns:
        The loss in fp32 (fp64 for fp64 probs).

    Raises:
        ValueError: as :func:`focal_loss_with_probs`.
    """
    return focal_loss_with_probs(probs, targets, None, 0.0, reduction, eps, ignore_index=ignore_index)


def nll_loss_with_probs(probs: Tensor, target: Tensor, reduction: str = "mean", eps: float = 1e-6,
                        ignore_index: int = -100) -> Tensor:
    """Negative log likelihood of softmax probabilities, -sum_j t_j log p_j per row.

    ``F.nll_loss(torch.log(probs), target)`` in the ``[..., C]`` layout. Probabilities are
    clamped below at eps (for fp16 at least about 6.1e-5) so that a zero probability gives
    a finite loss; -log p needs no upper clamp.

    Args:
        probs: probabilities, float ``[..., C]`` (rows normally sum to 1).
        target: integer indices ``probs.shape[:-1]`` in [0, C) or ``ignore_index``; or
            float one-hot (or soft) targets of shape ``probs.shape``.
        reduction: "none" (per row ``[...]``, ignored rows 0), "sum", or "mean" over the
            non-ignored rows (all ignored gives 0, not F.nll_loss's NaN).
        eps: lower clamp, in (0, 0.5).
        ignore_index: index target to ignore.

    Returns:
        The loss in fp32 (fp64 for fp64 probs).

    Raises:
        ValueError: probs not floating or outside [0, 1], bad target, eps or reduction.
    """
    _check_probs(probs)
    checks.check_reduction(reduction)
    eps = max(checks.check_eps(eps), grad_floor(probs.dtype))
    dtype = checks.compute_dtype(probs)
    log_p = torch.log(probs.to(dtype).clamp(min=eps))
    if isinstance(target, Tensor) and target.is_floating_point():
        if target.shape != probs.shape:
            raise ValueError(f"target with a float dtype must have shape {tuple(probs.shape)}, "
                             f"got {tuple(target.shape)}")
        checks.check_unit_interval(target, "target")
        loss = -(target.to(dtype) * log_p).sum(-1)
        count = torch.tensor(loss.numel(), dtype=dtype, device=loss.device)
    elif isinstance(target, Tensor) and target.dtype in checks.INT_DTYPES:
        target = checks.check_int_labels(target, probs, ignore_index, "target", background_ok=False)
        valid = target != ignore_index
        index = torch.where(valid, target, torch.zeros_like(target))
        picked = log_p.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # [..., C] -> [...]
        loss = torch.where(valid, -picked, torch.zeros_like(picked))
        count = valid.sum().to(dtype)
    else:
        raise ValueError(f"target must be an integer tensor of shape {tuple(probs.shape[:-1])} or a float tensor "
                         f"of shape {tuple(probs.shape)}, got {getattr(target, 'dtype', type(target).__name__)}")
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / count.clamp(min=1)
