"""The rest of the focal-loss family.

- Probability inputs (mmdet's ``activated=True``): :func:`focal_loss_with_probs`,
  :func:`binary_cross_entropy_with_probs`, :func:`nll_loss_with_probs`.
- FL* from the appendix of Lin et al. 2017: :func:`sigmoid_focal_loss_star`.
- A per-image alpha from object counts: :func:`alpha_from_object_counts`.
- Cosine loss plus softmax focal loss: :func:`focal_cosine_loss`.

The generalised focal losses, :func:`~detfocal.losses.quality_focal_loss` (GFL) and
:func:`~detfocal.losses.varifocal_loss` (VarifocalNet), live in
:mod:`detfocal.losses.quality`.

Conventions follow :mod:`detfocal.losses.focal`: ``[..., C]`` inputs, math in fp32 (fp64
stays fp64), integer labels with C = background, "none"/"sum"/"mean" reductions, and
finite gradients at saturated inputs. Every loss here is written with softplus/clamps
that autograd differentiates safely, so gradients also flow into float targets and alpha
tensors that require grad; the two whose naive autograd would meet inf * 0 (a power below
1 of something that reaches 0) compute their gradient analytically, in
:mod:`detfocal.losses.quality`, which shares this module's argument checks.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks
from .checks import AlphaLike
from .softmax import softmax_focal_loss


# --------------------------------------------------------------------------------------
# Shared helpers.
# --------------------------------------------------------------------------------------
def _grad_floor(dtype: torch.dtype) -> float:
    """The smallest denominator d whose slope 1/d (times up to ~4) still fits ``dtype``.

    Gradients go back in the input's dtype. For fp16 (max 65504) this is about 6.1e-5, so
    a clamp at it keeps -log p's slope 1/p finite; for bf16/fp32/fp64 it is ~1e-38 or less
    and never binds.
    """
    return 4.0 / torch.finfo(dtype).max


def _dense_targets(targets: Tensor, logits: Tensor, ignore_index: int, dtype: torch.dtype,
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


def _select_kept_rows(x: Tensor, valid: Tensor | None) -> Tensor:
    """``x`` with its ignored rows set to 0.

    An ignored row may hold any logit, inf and NaN included (padding, masked anchors);
    zeroing its loss afterwards keeps the value finite but not the gradient (0 * inf is NaN).
    """
    return x if valid is None else torch.where(valid.unsqueeze(-1), x, 0)


def _reduce_elementwise(loss: Tensor, valid: Tensor | None, reduction: str) -> Tensor:
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


def _alpha_weight(alpha: Tensor | None, t: Tensor) -> Tensor | float:
    """alpha_t = alpha t + (1 - alpha)(1 - t) (Lin et al. 2017, eq. 3, extended to soft t)."""
    return 1.0 if alpha is None else alpha * t + (1 - alpha) * (1 - t)


# --------------------------------------------------------------------------------------
# Probability inputs.
# --------------------------------------------------------------------------------------
def _clamped_probs(probs: Tensor, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """p and 1 - p, each clamped to [eps, 1 - eps] in ``dtype``.

    1 - p is taken from the unclamped p: it is exact for p >= 0.5 and stays >= eps even
    where 1 - eps rounds to 1 in fp32, so the log never sees 0.
    """
    eps = max(eps, _grad_floor(probs.dtype))
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
    t, valid = _dense_targets(targets, probs, ignore_index, dtype)
    p, p_neg = _clamped_probs(probs, eps, dtype)
    ce = -(t * torch.log(p) + (1 - t) * torch.log(p_neg))
    # 1 - p_t >= eps after the clamp, so even gamma < 1 has a finite slope here.
    one_minus_pt = t * p_neg + (1 - t) * p
    loss = ce * one_minus_pt.pow(gamma) * _alpha_weight(alpha_t, t)
    return _reduce_elementwise(loss, valid, reduction)


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
    eps = max(checks.check_eps(eps), _grad_floor(probs.dtype))
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


# --------------------------------------------------------------------------------------
# FL* (Lin et al. 2017, appendix A).
# --------------------------------------------------------------------------------------
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
    t, valid = _dense_targets(targets, logits, ignore_index, dtype)
    z = _select_kept_rows(logits.to(dtype), valid)
    loss = (t * F.softplus(-(gamma * z + beta)) + (1 - t) * F.softplus(gamma * z - beta)) / gamma
    return _reduce_elementwise(loss * _alpha_weight(alpha_t, t), valid, reduction)


# --------------------------------------------------------------------------------------
# Dynamic alpha from object counts.
# --------------------------------------------------------------------------------------
def alpha_from_object_counts(num_objs: Tensor | Sequence[float]) -> Tensor:
    """Per-image alpha, alpha_i = clamp(num_objs_i / mean(num_objs), 0, 1).

    Images with fewer objects than the batch average get a proportionally smaller alpha;
    those at or above it get 1. Note what alpha means in the focal loss: positives are
    weighted by alpha and negatives by 1 - alpha, so an image with at least the mean count
    has its negatives weighted 0. If every count is 0 all alphas are 0 (there are no
    positives to weight).

    Feed it to ``sigmoid_focal_loss`` as a per-row alpha, broadcast over the anchors:
    ``alpha[:, None, None]`` for logits ``[B, A, C]``, ``alpha[:, None]`` for ``[B, C]``
    (a bare length-C 1-d alpha would be read as per class).

    Args:
        num_objs: non-negative object counts per image, 1-d, non-empty.

    Returns:
        Float ``[B]`` alphas in [0, 1] (fp64 for fp64 counts, else fp32), on the counts' device.

    Raises:
        ValueError: counts not 1-d, empty, negative, non-finite or not numeric.

    Example:
        >>> from detfocal.losses import sigmoid_focal_loss
        >>> alpha = alpha_from_object_counts(torch.tensor([1, 3, 8]))   # [0.25, 0.75, 1.0]
        >>> logits, labels = torch.randn(3, 100, 80), torch.full((3, 100), 80)
        >>> loss = sigmoid_focal_loss(logits, labels, alpha=alpha[:, None, None], reduction="sum")
    """
    try:
        counts = torch.as_tensor(num_objs)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"num_objs holds {num_objs!r} ({type(num_objs).__name__}), expected a non-empty 1-d "
                         "sequence or tensor of per-image object counts") from None
    if counts.dtype == torch.bool or counts.is_complex():
        raise ValueError(f"num_objs must hold real counts, got dtype {counts.dtype}")
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError("num_objs must be a non-empty 1-d sequence of per-image counts, got shape "
                         f"{tuple(counts.shape)}")
    counts = counts.to(checks.compute_dtype(counts))
    checks.check_values(counts, ~(torch.isfinite(counts) & (counts >= 0)), "num_objs", "finite counts >= 0")
    # All-zero counts: 0 / tiny = 0 instead of 0 / 0.
    return (counts / counts.mean().clamp(min=torch.finfo(counts.dtype).tiny)).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------
# Focal cosine loss.
# --------------------------------------------------------------------------------------
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
    x = _select_kept_rows(logits.to(dtype), valid)
    index = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(-1)
    norm = torch.linalg.vector_norm(x, dim=-1).clamp(min=max(1e-12, _grad_floor(logits.dtype)))
    cosine = 1 - x.gather(-1, index).squeeze(-1) / norm  # [..., C] -> [...]
    cosine = torch.where(valid, cosine, torch.zeros_like(cosine))
    if reduction == "none":
        return cosine_weight * cosine + focal
    if reduction == "sum":
        return cosine_weight * cosine.sum() + focal
    return cosine_weight * cosine.sum() / valid.sum().clamp(min=1).to(dtype) + focal
