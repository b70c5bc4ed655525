"""Softmax focal loss: the multi-class variant, with (1 - p_t)^gamma applied per sample.

The focal loss of Lin et al. 2017 ("Focal Loss for Dense Object Detection") on a softmax
over C classes. Like :mod:`detfocal.losses.focal`, the gradient is analytic and saved in
the forward pass (:mod:`detfocal.losses.autograd`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import checks
from .autograd import LossAndGrads, reduce_loss_and_grad, saved_grad_loss

__all__ = ["softmax_focal_loss"]


def _softmax_focal(z: Tensor, target: Tensor, alpha: Tensor | None, gamma: float, ignore_index: int,
                   label_smoothing: float, need_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-row loss ``[...]``, per-row weight alpha_t (0 on ignored rows) and dloss_row/dz ``[..., C]``.

    loss = (1 - p_t)^gamma H, H = (1 - eps) alpha_t (-log p_t) + eps/C * sum_j alpha_j (-log p_j)
    (alpha = 1 when None), so gamma = 0 is exactly ``F.cross_entropy(weight=alpha,
    label_smoothing=eps)``, which weights each smoothing term by its own class. With u = 1 - p_t:
        dloss/dz_j = u^gamma [dH/dz_j - gamma H p_t (delta_tj - p_j) / u],
    where (delta_tj - p_j) / u is 1 for j = t and -p_j / u in [-1, 0] otherwise: bounded,
    so no u^(gamma - 1) ever appears.
    """
    num_classes = z.shape[-1]
    valid = target != ignore_index
    valid_f = valid.to(z.dtype)
    z = torch.where(valid.unsqueeze(-1), z, 0)  # an ignored row may hold inf/NaN: 0 * NaN would leak out
    index = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(-1)  # [..., 1]
    log_p = torch.log_softmax(z, dim=-1)
    log_pt = log_p.gather(-1, index).squeeze(-1)
    u = -torch.expm1(log_pt)  # 1 - p_t, accurate near p_t = 1
    a_t = torch.ones_like(log_pt) if alpha is None else alpha[index.squeeze(-1)]
    a_t = a_t * valid_f
    h = -(1 - label_smoothing) * a_t * log_pt
    if label_smoothing:
        smooth = log_p.sum(-1) if alpha is None else (log_p * alpha).sum(-1)
        h = h - label_smoothing / num_classes * smooth * valid_f
    weight = u.pow(gamma)
    loss = weight * h
    if not need_grad:
        return loss, a_t, None
    p = log_p.exp()
    p_t = log_pt.exp()
    one_hot_t = torch.zeros_like(z).scatter_(-1, index, 1.0)
    dh = (1 - label_smoothing) * a_t.unsqueeze(-1) * (p - one_hot_t)
    if label_smoothing:
        # d/dz_j sum_k alpha_k (-log p_k) = (sum_k alpha_k) p_j - alpha_j
        alpha_sum, alpha_j = (num_classes, 1.0) if alpha is None else (alpha.sum(), alpha)
        dh = dh + label_smoothing / num_classes * valid_f.unsqueeze(-1) * (alpha_sum * p - alpha_j)
    u_safe = torch.where(u > 0, u, 1).unsqueeze(-1)  # a finite second derivative (create_graph) at u = 0
    ratio = torch.where(u.unsqueeze(-1) > 0, -p / u_safe, 0).clamp(-1.0, 0.0)
    ratio = ratio.scatter(-1, index, 1.0)
    coef = (gamma * h * p_t).unsqueeze(-1)
    grad = weight.unsqueeze(-1) * (dh - coef * ratio)
    return loss, a_t, grad


def softmax_focal_loss(
    logits: Tensor,
    target: Tensor,
    alpha: Sequence[float] | Tensor | None = None,
    gamma: float = 2.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    *,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Multi-class (softmax) focal loss, -alpha_t (1 - p_t)^gamma log p_t per sample.

    The factor (1 - p_t)^gamma multiplies each sample's own term, not the batch-mean cross
    entropy (which would not be a focal loss).

    Args:
        logits: float ``[..., C]``.
        target: integer class indices of shape ``logits.shape[:-1]``, in [0, C) or ``ignore_index``.
        alpha: None, or a per-class sequence/tensor of C finite weights >= 0
            (``F.cross_entropy``'s ``weight``), without gradient.
        gamma: focusing parameter, a finite real >= 0; gamma = 0 is exactly cross entropy.
        reduction: "none" (per-sample ``[...]``), "sum", or "mean", which, like
            ``F.cross_entropy``, divides by the sum of alpha_t over the non-ignored targets.
        ignore_index: target value to ignore.
        label_smoothing: eps in [0, 1], as in ``F.cross_entropy``.

    Returns:
        The loss in fp32 (fp64 for fp64 logits). An ignored row may hold any logit, inf and
        NaN included, and gets loss 0 and gradient 0.

    Raises:
        ValueError: on bad logits, target shape or values, gamma, alpha (also one that
            requires grad) or reduction.

    Example:
        >>> logits = torch.randn(8, 5, requires_grad=True)
        >>> softmax_focal_loss(logits, torch.randint(0, 5, (8,)), gamma=2.0).backward()
    """
    checks.check_logits(logits)
    checks.check_reduction(reduction)
    gamma = checks.check_gamma(gamma)
    label_smoothing = checks.check_smoothing(label_smoothing)
    if not isinstance(target, Tensor) or target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor of shape {tuple(logits.shape[:-1])}, "
                         f"got {getattr(target, 'dtype', type(target).__name__)}")
    target = checks.check_int_labels(target, logits, ignore_index, "target", background_ok=False)
    dtype = checks.compute_dtype(logits)
    num_classes = logits.shape[-1]
    alpha_t = None
    if alpha is not None:
        checks.check_no_grad(alpha, "alpha", "softmax_focal_loss")
        try:
            alpha_t = torch.as_tensor(alpha, dtype=dtype, device=logits.device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"alpha holds {alpha!r} ({type(alpha).__name__}), expected None or C = {num_classes} "
                             "per-class weights") from None
        if alpha_t.shape != (num_classes,):
            raise ValueError(f"alpha must be None or a per-class sequence of length C = {num_classes}, "
                             f"got shape {tuple(alpha_t.shape)}")
        checks.check_values(alpha_t, ~(torch.isfinite(alpha_t) & (alpha_t >= 0)), "alpha", "finite weights >= 0")

    def fn(z: Tensor, needs: tuple[bool, ...]) -> LossAndGrads:
        loss, a_t, grad = _softmax_focal(z.to(dtype), target, alpha_t, gamma, ignore_index, label_smoothing, needs[0])
        # F.cross_entropy gives NaN when everything is ignored; 0 is the useful answer here.
        divisor = a_t.sum().clamp(min=torch.finfo(dtype).tiny) if reduction == "mean" else None
        return reduce_loss_and_grad(loss, (grad,), reduction, divisor)

    # "none" gives one loss per row: its upstream gradient is broadcast over the classes.
    return saved_grad_loss(fn, logits, rowwise=reduction == "none")
