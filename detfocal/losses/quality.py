"""Generalised focal losses: GFL's QFL and VarifocalNet's VFL, with analytic gradients.

- :func:`quality_focal_loss`: Li et al. 2020, "Generalized Focal Loss: Learning Qualified
  and Distributed Bounding Boxes for Dense Object Detection".
- :func:`varifocal_loss`: Zhang et al. 2021, "VarifocalNet: An IoU-aware Dense Object
  Detector".

Both train the classification score of the labelled class towards a soft target, the box's
IoU, rather than 1. Conventions are those of :mod:`detfocal.losses.focal`, with its
argument checks (:mod:`detfocal.losses.checks`): ``[..., C]`` inputs, math in fp32 (fp64
stays fp64), "none"/"sum"/"mean" reductions and finite gradients at saturated inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks
from .autograd import LossAndGrads, reduce_loss_and_grad, saved_grad_loss
from .focal import _binary_cross_entropy, _limit_product

__all__ = ["quality_focal_loss", "varifocal_loss"]


# --------------------------------------------------------------------------------------
# Generalised focal losses: QFL (GFL) and VFL (VarifocalNet), with analytic gradients.
# --------------------------------------------------------------------------------------
def _qfl_terms(z: Tensor, y: Tensor | float, beta: float, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Per-element QFL = |y - p|^beta BCE(p, y) and its derivative w.r.t. the logit z.

    With d = p - y and BCE = y softplus(-z) + (1 - y) softplus(z) (so dBCE/dz = d):
        dQFL/dz = |d|^beta (d + beta sign(d) p (1 - p) / |d| BCE).
    Autograd would form beta |d|^(beta - 1), inf where d = 0 (e.g. p underflowing to the
    target 0) and NaN after multiplying by p (1 - p) = 0. Here p (1 - p) / |d| is 1 - p for
    y = 0 and p for y = 1, bounded; for soft y at d = 0 exactly (the cusp of |d|^beta,
    beta < 1, a minimum of the loss) the subgradient 0 is used.
    """
    p = torch.sigmoid(z)
    p_neg = torch.sigmoid(-z)  # 1 - p without cancellation
    # d = p - y, accurate at both ends: for y >= 0.5 as (1 - y) - (1 - p), exact at y = 1.
    if isinstance(y, Tensor):
        d = torch.where(y >= 0.5, (1 - y) - p_neg, p - y)
    else:
        d = p - y if y < 0.5 else (1 - y) - p_neg
    abs_d = d.abs()
    bce = _binary_cross_entropy(z, y)
    weight = abs_d.pow(beta)
    loss = weight * bce
    if not need_grad:
        return loss, None
    # The safe denominator keeps a second derivative (create_graph) finite at d = 0.
    ratio = torch.where(abs_d > 0, p * p_neg / torch.where(abs_d > 0, abs_d, 1), 0)
    grad = weight * (d + beta * torch.sign(d) * _limit_product(ratio, bce))  # ratio -> 0 at an infinite logit
    return loss, grad


def quality_focal_loss(
    logits: Tensor,
    labels: Tensor,
    scores: Tensor,
    beta: float = 2.0,
    reduction: str = "none",
    ignore_index: int = -1,
) -> Tensor:
    """Quality focal loss, QFL(p) = -|y - p|^beta ((1 - y) log(1 - p) + y log p) (Li et al. 2020).

    From GFL ("Generalized Focal Loss: Learning Qualified and Distributed Bounding Boxes
    for Dense Object Detection"): the classification score of the labelled class regresses
    the box's IoU ``score``; every other class has target 0. With 0/1 scores this is
    ``sigmoid_focal_loss(alpha=-1, gamma=beta)``. No one-hot is built: every element is
    computed as a negative and the one positive column per row is recomputed and scattered.

    Args:
        logits: float ``[..., C]``.
        labels: integer ``logits.shape[:-1]``: c in [0, C) positive for class c, C
            background, ``ignore_index`` ignored.
        scores: float ``logits.shape[:-1]``, the positives' IoU targets in [0, 1] (read only
            on positive rows).
        beta: >= 0 (GFL uses 2); any value, 0.5 included, has a finite gradient.
        reduction: "none" (``[..., C]``, ignored rows 0), "sum", or "mean" over the
            non-ignored elements.
        ignore_index: label of rows to ignore.

    Returns:
        The loss in fp32 (fp64 for fp64 logits).

    Raises:
        ValueError: bad logits, labels, scores (shape, dtype, positives outside [0, 1], or
            requiring grad: GFL's IoU targets are detached), beta or reduction.
    """
    checks.check_logits(logits)
    checks.check_reduction(reduction)
    beta = checks.check_gamma(beta, "beta")
    if not isinstance(labels, Tensor) or labels.dtype not in checks.INT_DTYPES:
        raise ValueError(f"labels must be an integer tensor of shape {tuple(logits.shape[:-1])}, "
                         f"got {getattr(labels, 'dtype', type(labels).__name__)}")
    labels = checks.check_int_labels(labels, logits, ignore_index, "labels")
    if not isinstance(scores, Tensor) or not scores.is_floating_point() or scores.shape != labels.shape:
        raise ValueError(f"scores must be a float tensor of shape {tuple(labels.shape)}, got "
                         f"{tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}"
                         f"{' ' + str(scores.dtype) if isinstance(scores, Tensor) else ''}")
    checks.check_no_grad(scores, "scores", "quality_focal_loss")
    num_classes = logits.shape[-1]
    valid = labels != ignore_index
    is_pos = checks.foreground_mask(labels, num_classes, ignore_index)
    checks.check_unit_interval(torch.where(is_pos, scores, 0), "scores")  # read only on positive rows
    dtype = checks.compute_dtype(logits)
    index = torch.where(is_pos, labels, torch.zeros_like(labels)).unsqueeze(-1)  # [...] -> [..., 1]
    keep = is_pos.unsqueeze(-1)
    score_pos = torch.where(is_pos, scores.to(dtype), 0).unsqueeze(-1)  # [...] -> [..., 1]
    valid_rows = valid.unsqueeze(-1)  # [...] -> [..., 1]
    count = (valid.sum().to(dtype) * num_classes).clamp(min=1)

    def fn(z: Tensor, needs: tuple[bool, ...]) -> LossAndGrads:
        z = z.to(dtype)
        loss, grad = _qfl_terms(z, 0.0, beta, needs[0])
        loss_pos, grad_pos = _qfl_terms(z.gather(-1, index), score_pos, beta, needs[0])
        loss = torch.where(valid_rows, loss.scatter(-1, index, torch.where(keep, loss_pos, loss.gather(-1, index))), 0)
        if grad is not None and grad_pos is not None:
            grad = grad.scatter(-1, index, torch.where(keep, grad_pos, grad.gather(-1, index)))
            grad = torch.where(valid_rows, grad, 0)
        return reduce_loss_and_grad(loss, (grad,), reduction, count)

    return saved_grad_loss(fn, logits)


def varifocal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.75,
    gamma: float = 2.0,
    iou_weighted: bool = True,
    reduction: str = "none",
) -> Tensor:
    """Varifocal loss (Zhang et al. 2021, "VarifocalNet: An IoU-aware Dense Object Detector").

    VFL(p, q) = -q (q log p + (1 - q) log(1 - p)) for q > 0 and -alpha p^gamma log(1 - p)
    for q = 0: positives are weighted by their IoU target q (by 1 if not ``iou_weighted``),
    negatives are down-weighted focal-style. The gradient is analytic, with
    d/dz[alpha p^gamma softplus(z)] = alpha p^gamma (gamma (1 - p) softplus(z) + p), so
    gamma < 1 at p -> 0 gives 0 instead of autograd's inf * 0.

    Args:
        logits: float ``[..., C]``.
        targets: float ``[..., C]`` in [0, 1]: the IoU at the ground-truth class, 0 elsewhere.
        alpha: weight >= 0 of the negatives (VFNet uses 0.75).
        gamma: focusing parameter >= 0 of the negatives.
        iou_weighted: weight positives by q (True) or by 1.
        reduction: "none" (``[..., C]``), "sum" or "mean" over all elements.

    Returns:
        The loss in fp32 (fp64 for fp64 logits).

    Raises:
        ValueError: bad logits, targets (shape, dtype, values outside [0, 1], or requiring
            grad: VarifocalNet's IoU targets are detached), alpha, gamma or reduction.
    """
    checks.check_logits(logits)
    checks.check_reduction(reduction)
    alpha = checks.check_real(alpha, "alpha")
    gamma = checks.check_gamma(gamma)
    if not isinstance(targets, Tensor) or not targets.is_floating_point() or targets.shape != logits.shape:
        raise ValueError(f"targets must be a float tensor of shape {tuple(logits.shape)}, got "
                         f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}"
                         f"{' ' + str(targets.dtype) if isinstance(targets, Tensor) else ''}")
    checks.check_no_grad(targets, "targets", "varifocal_loss")
    checks.check_unit_interval(targets, "targets")
    dtype = checks.compute_dtype(logits)

    # The targets go in as an input, not a closure variable: the saved-gradient Function keeps
    # its function until backward, and a logits-sized tensor captured there would stay alive.
    def fn(z: Tensor, q: Tensor, needs: tuple[bool, ...]) -> LossAndGrads:
        z = z.to(dtype)
        q = q.to(dtype)
        positive = q > 0
        p = torch.sigmoid(z)
        sp_neg = F.softplus(z)  # -log(1 - p)
        bce = _binary_cross_entropy(z, q)
        weight_pos = q if iou_weighted else torch.ones_like(q)
        weight_neg = alpha * p.pow(gamma)
        # _limit_product: at an infinite logit, 0 * inf has the limit 0 (alpha = 0, 1 - p = 0).
        loss = torch.where(positive, weight_pos * bce, _limit_product(weight_neg, sp_neg))
        grad = None
        if needs[0]:
            grad_neg = weight_neg * (gamma * _limit_product(torch.sigmoid(-z), sp_neg) + p)
            grad = torch.where(positive, weight_pos * (p - q), grad_neg)
        return reduce_loss_and_grad(loss, (grad, None), reduction)

    return saved_grad_loss(fn, logits, targets)
