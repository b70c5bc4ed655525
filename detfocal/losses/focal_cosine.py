"""Focal cosine loss: the cosine loss to the one-hot target plus the softmax focal loss.

Conventions follow :mod:`detfocal.losses.focal`: ``[..., C]`` inputs, math in fp32 (fp64
stays fp64), integer labels with C = background, "none"/"sum"/"mean" reductions, and
finite gradients at saturated inputs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import checks
from ._elementwise import grad_floor, select_kept_rows
from .softmax import softmax_focal_loss

__all__ = ["focal_cosine_loss"]


def focal_cosine_loss(
    logits: Tensor,
    target: Tensor,
    gamma: float = 1.0,
    alpha: Sequence[float] | Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    cosine_weight: float = 1.0,
) -> Tensor:
    """Cosine loss to the one-hot target plus the softmax focal loss, per sample.

    loss = cosine_weight * (1 - cos(x, e_t)) + FL_softmax(x, t), where
    cos(x, e_t) = x_t / ||x||_2 is the cosine between the logit vector and the one-hot
    target (the cosine loss of Barz & Denzler 2020, "Deep Learning on Small Datasets
    without Pre-Training using Cosine Loss"), and FL_softmax = -alpha_t (1 - p_t)^gamma log p_t
    is :func:`~detfocal.losses.softmax_focal_loss`. The pairing follows Kim et al. 2020,
    "Data-Efficient Deep Learning Method for Image Classification Using Data Augmentation,
    Focal Cosine Loss, and Ensemble". The cosine term equals
    ``F.cosine_embedding_loss(x, onehot, 1)``.

    ||x|| is floored at 1e-12 (fp16: about 6.1e-5, so that the slope ~1/||x|| fits), which
    makes an all-zero logit row give cos = 0 and a finite gradient.

    Args:
        logits: float ``[..., C]``.
        target: integer indices ``logits.shape[:-1]`` in [0, C) or ``ignore_index``.
        gamma: focusing parameter >= 0 of the focal term.
        alpha: None or C per-class weights of the focal term (``F.cross_entropy``'s weight).
        reduction: "none" (per sample ``[...]``, ignored rows 0), "sum", or "mean": the
            cosine term averaged over the non-ignored samples plus the focal term reduced
            as ``softmax_focal_loss`` does (divided by the sum of alpha_t).
        ignore_index: target value to ignore.
        cosine_weight: weight >= 0 of the cosine term (0 leaves the focal loss alone).

    Returns:
        The loss in fp32 (fp64 for fp64 logits).

    Raises:
        ValueError: bad logits, target, gamma, alpha, cosine_weight or reduction.
    """
    cosine_weight = checks.check_real(cosine_weight, "cosine_weight")
    # softmax_focal_loss validates logits, target, gamma, alpha and reduction.
    focal = softmax_focal_loss(logits, target, alpha, gamma, reduction, ignore_index)
    dtype = checks.compute_dtype(logits)
    target = target.long()
    valid = target != ignore_index
    x = select_kept_rows(logits.to(dtype), valid)
    index = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(-1)
    norm = torch.linalg.vector_norm(x, dim=-1).clamp(min=max(1e-12, grad_floor(logits.dtype)))
    cosine = 1 - x.gather(-1, index).squeeze(-1) / norm  # [..., C] -> [...]
    cosine = torch.where(valid, cosine, torch.zeros_like(cosine))
    if reduction == "none":
        return cosine_weight * cosine + focal
    if reduction == "sum":
        return cosine_weight * cosine.sum() + focal
    return cosine_weight * cosine.sum() / valid.sum().clamp(min=1).to(dtype) + focal
