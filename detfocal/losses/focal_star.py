"""FL*, the alternative focal loss of Lin et al. 2017 ("Focal Loss for Dense Object Detection"), appendix A.

Conventions follow :mod:`detfocal.losses.focal`: ``[..., C]`` inputs, math in fp32 (fp64
stays fp64), integer labels with C = background, "none"/"sum"/"mean" reductions, and
finite gradients at saturated inputs.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from . import checks
from ._elementwise import alpha_weight, dense_targets, reduce_elementwise, select_kept_rows
from .checks import AlphaLike

__all__ = ["sigmoid_focal_loss_star"]


def sigmoid_focal_loss_star(
    logits: Tensor,
    targets: Tensor,
    gamma: float = 4.0,
    beta: float = 0.0,
    alpha: AlphaLike = 0.25,
    reduction: str = "none",
    *,
    ignore_index: int = -1,
) -> Tensor:
    """FL*, the paper's alternative focal loss: -alpha_t log(sigmoid(gamma x_t + beta)) / gamma.

    Lin et al. 2017, appendix A: x_t = x for t = 1 and -x for t = 0, p*_t =
    sigmoid(gamma x_t + beta), FL* = -log(p*_t) / gamma. gamma = 2, beta = 1 gave 33.8 AP and
    gamma = 4, beta = 0 gave 33.9 AP against FL's 34.0. Written with softplus
    (-log sigmoid(s) = softplus(-s)), whose slope is a sigmoid: finite at any logit. A soft
    target t mixes the two cases linearly, t FL*(x_t=x) + (1 - t) FL*(x_t=-x), like cross
    entropy; for 0/1 targets and beta = 0 this is fvcore's ``sigmoid_focal_loss_star``.

    Args:
        logits: float ``[..., C]``.
        targets: float ``[..., C]`` in [0, 1], or integer labels ``[...]`` as in
            ``sigmoid_focal_loss`` (C = background, ``ignore_index`` ignored).
        gamma: > 0 (it divides the loss).
        beta: shift, any finite real.
        alpha: as in ``sigmoid_focal_loss`` (the paper's FL* has none: pass -1).
        reduction: "none", "sum" or "mean" over the non-ignored elements.
        ignore_index: integer label of rows to ignore.

    Returns:
        The loss in fp32 (fp64 for fp64 logits).

    Raises:
        ValueError: gamma <= 0, non-finite beta, or bad logits, targets, alpha or reduction.
    """
    checks.check_logits(logits)
    checks.check_reduction(reduction)
    gamma = checks.check_real(gamma, "gamma", low_open=True)
    beta = checks.check_real(beta, "beta", low=-math.inf)
    dtype = checks.compute_dtype(logits)
    alpha_t = checks.alpha_tensor(alpha, logits, dtype)
    t, valid = dense_targets(targets, logits, ignore_index, dtype)
    z = select_kept_rows(logits.to(dtype), valid)
    loss = (t * F.softplus(-(gamma * z + beta)) + (1 - t) * F.softplus(gamma * z - beta)) / gamma
    return reduce_elementwise(loss * alpha_weight(alpha_t, t), valid, reduction)
