"""Sigmoid focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection").

The loss computes its gradient analytically in the forward pass and saves only that
gradient for backward (:mod:`detfocal.losses.autograd`), so backward is a single multiply
and at most one logits-sized tensor stays alive between forward and backward. The
multi-class variant is :mod:`detfocal.losses.softmax`.

Why analytic: autograd differentiates ``(1 - p_t) ** gamma`` into ``gamma * (1 - p_t) **
(gamma - 1)``, which is ``inf`` at saturated logits when gamma < 1 and turns into NaN
gradients (torchvision, fvcore, mmdet's python path). The closed form below has no
negative power, so it is finite for every gamma >= 0 and every logit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checks
from .autograd import LossAndGrads, combine_divisors, reduce_loss_and_grad, saved_grad_loss
from .checks import AlphaLike
from .compile import select_backend


# --------------------------------------------------------------------------------------
# Elementwise math. Written once and shared by the eager path and the torch.compile path.
# --------------------------------------------------------------------------------------
def _limit_product(weight: Tensor | float, value: Tensor) -> Tensor:
    """``weight * value``, and 0 where ``weight`` is 0 even if ``value`` is inf.

    At an infinite logit a cross entropy is inf. Where the factor in front of it is exactly
    0 there (an alpha_t of 0, a saturated sigmoid), the product's limit is 0, not NaN.
    Every caller's ``weight`` is NaN wherever the logit is, so a NaN logit still gives NaN.
    """
    if not isinstance(weight, Tensor):
        return value * weight if weight else torch.zeros_like(value)
    return torch.where(weight == 0, 0, weight * value)


def _binary_cross_entropy(z: Tensor, t: Tensor | float) -> Tensor:
    """CE = t softplus(-z) + (1 - t) softplus(z), accurate on both sides of 0.

    At z = +inf with t = 1 (or -inf with t = 0) the term of the saturated side is 0 times
    inf; it is 0 at every z, so its limit is too. Selected by where on the logit rather
    than on t, so a second derivative (create_graph) still sees d CE / dt at finite z.
    """
    ce = t * F.softplus(-z) + (1 - t) * F.softplus(z)
    return torch.where(z.isinf() & ce.isnan(), 0, ce)


def focal_terms(z: Tensor, t: Tensor | float, alpha: Tensor | None, gamma: float,
                need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Per-element sigmoid focal loss and its derivative w.r.t. the logit.

    With p = sigmoid(z), q = 1 - p_t = t(1-p) + (1-t)p and CE the binary cross entropy:
        loss = alpha_t * q**gamma * CE                                  (paper eq. 5)
        dloss/dz = alpha_t * q**gamma * ((p - t) + gamma * r * (1 - 2t) * CE),
    where r = p(1-p)/q lies in [0, 1]. For t = 1 this is the paper's
    alpha (1-p)^gamma (gamma p log p + p - 1). Soft targets t in [0, 1] follow
    torchvision's definition exactly.

    Args:
        z: logits, fp32 or fp64.
        t: targets broadcastable to ``z`` (or a Python float).
        alpha: weight of the positive part, broadcastable to ``z``; None for no weighting.
        gamma: focusing parameter >= 0.
        need_grad: also return dloss/dz.
    """
    p = torch.sigmoid(z)
    p_neg = torch.sigmoid(-z)  # 1 - p without the cancellation of 1 - sigmoid(z)
    ce = _binary_cross_entropy(z, t)
    q = t * p_neg + (1 - t) * p
    weight = q.pow(gamma)
    if alpha is not None:
        weight = weight * (alpha * t + (1 - alpha) * (1 - t))
    loss = _limit_product(weight, ce)  # alpha_t = 0 (alpha 0 or 1) at an infinite CE: 0
    if not need_grad:
        return loss, None
    grad = (1 - t) * p - t * p_neg  # p - t, exact at saturation
    if gamma:
        # r -> 0 where q underflows to 0; there q**gamma is 0 too. The safe denominator keeps
        # a second derivative (create_graph) finite.
        r = (p * p_neg / torch.where(q > 0, q, 1)).clamp(max=1.0)
        # At z = +-inf, r = 0 and CE = inf: r CE -> 0 (exponential against linear).
        grad = grad + gamma * (1 - 2 * t) * _limit_product(r, ce)
    return loss, weight * grad


def focal_target_grads(z: Tensor, t: Tensor, alpha: Tensor | None, gamma: float, need_t: bool,
                       need_alpha: bool) -> tuple[Tensor | None, Tensor | None]:
    """Elementwise d loss / d t and d loss / d alpha of :func:`focal_terms` (soft-target distillation, learned alpha).

    With q = t(1 - p) + (1 - t)p, CE = t softplus(-z) + (1 - t) softplus(z) and
    alpha_t = alpha t + (1 - alpha)(1 - t): dq/dt = 1 - 2p, dCE/dt = softplus(-z) - softplus(z)
    = -z and dalpha_t/dt = 2 alpha - 1, so
        dloss/dt = q**gamma ((2 alpha - 1) CE + alpha_t (gamma (1 - 2p) CE / q - z)),
        dloss/dalpha = (2t - 1) q**gamma CE.
    CE / q is bounded (q -> 0 only for a hard target at a saturated logit, where CE -> 0 as
    fast), so even gamma < 1 needs no q**(gamma - 1).
    """
    p = torch.sigmoid(z)
    ce = _binary_cross_entropy(z, t)
    q = t * torch.sigmoid(-z) + (1 - t) * p
    weight = q.pow(gamma)
    grad_t = grad_alpha = None
    if need_t:
        inner = -z
        if gamma:
            inner = inner + gamma * (1 - 2 * p) * torch.where(q > 0, ce / torch.where(q > 0, q, 1), 0)
        if alpha is not None:
            inner = _limit_product(2 * alpha - 1, ce) + _limit_product(alpha * t + (1 - alpha) * (1 - t), inner)
        grad_t = _limit_product(weight, inner)  # q**gamma -> 0 faster than z grows at a saturated hard target
    if need_alpha:
        grad_alpha = _limit_product((2 * t - 1) * weight, ce)
    return grad_t, grad_alpha


def focal_float_targets(z: Tensor, targets: Tensor, alpha: Tensor | None, gamma: float, reduction: str,
                        label_smoothing: float, normalizer: Tensor | None, needs: tuple[bool, ...]) -> LossAndGrads:
    """Float (soft or one-hot) targets of ``z``'s shape; ``needs``: gradients wanted for (z, targets, alpha)."""
    t = targets.to(z.dtype)
    if label_smoothing:
        t = t * (1 - label_smoothing) + label_smoothing / 2
    loss, grad = focal_terms(z, t, alpha, gamma, needs[0])
    grad_t = grad_alpha = None
    if needs[1] or needs[2]:
        grad_t, grad_alpha = focal_target_grads(z, t, alpha, gamma, needs[1], needs[2] and alpha is not None)
        if grad_t is not None and label_smoothing:
            grad_t = grad_t * (1 - label_smoothing)
    return reduce_loss_and_grad(loss, (grad, grad_t, grad_alpha), reduction, normalizer=normalizer)


def hard_terms(z: Tensor, positive: bool, alpha: Tensor | None, gamma: float,
               need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """:func:`focal_terms` for an exact 0/1 target, from one exp and one log1p per element.

    With the signed logit s = z (positive) or -z (negative), p_t = sigmoid(s), q = 1 - p_t:
        loss = alpha_t q^gamma softplus(-s),
        dloss/ds = -alpha_t q^gamma (gamma p_t softplus(-s) + q),   dloss/dz = +-dloss/ds.
    """
    s = z if positive else -z
    nonneg = s >= 0
    # where, not abs/clamp: at s = 0 autograd (create_graph) then differentiates one branch.
    e = torch.exp(torch.where(nonneg, -s, s))  # exp(-|s|)
    ce = torch.where(nonneg, 0, -s) + torch.log1p(e)  # softplus(-s) = -log p_t
    inv = 1.0 / (1.0 + e)
    p_t = torch.where(nonneg, inv, e * inv)
    q = torch.where(nonneg, e * inv, inv)
    weight = q.pow(gamma)
    if alpha is not None:
        weight = weight * (alpha if positive else 1 - alpha)
    loss = _limit_product(weight, ce)  # alpha_t = 0 (alpha 0 or 1) at an infinite CE: 0
    if not need_grad:
        return loss, None
    # At s = -inf, p_t = 0 and CE = inf: p_t CE -> 0, so the gradient is alpha_t, not NaN.
    grad_s = weight * (gamma * _limit_product(p_t, ce) + q) if gamma else weight * q
    return loss, (-grad_s if positive else grad_s)


def focal_int_targets(z: Tensor, labels: Tensor, alpha: Tensor | None, gamma: float, reduction: str,
                      ignore_index: int, label_smoothing: float, normalizer: Tensor | None,
                      needs: tuple[bool, ...]) -> LossAndGrads:
    """Integer labels ``[...]``: c in [0, C) positive for class c, C background, ignore_index ignored.

    No one-hot: every element is computed as a negative, then the one positive column of
    each foreground row is recomputed from a gather ([...] elements) and scattered in place.
    ``needs``: gradients wanted for (z, alpha); the alpha gradient (rarely wanted) is
    computed from a dense one-hot.
    """
    num_classes = z.shape[-1]
    valid = labels != ignore_index
    keep = valid.unsqueeze(-1)  # [...] -> [..., 1]
    # An ignored row may hold any logit, inf and NaN included (padding, masked anchors).
    # Select it out before the math: multiplying its loss and gradient by 0 after gives NaN.
    z = torch.where(keep, z, 0)
    is_pos = checks.foreground_mask(labels, num_classes, ignore_index).unsqueeze(-1)  # [..., 1]
    index = torch.where(is_pos.squeeze(-1), labels, torch.zeros_like(labels)).unsqueeze(-1)  # [..., 1]
    valid_f = keep.to(z.dtype)  # [..., 1]
    z_label = z.gather(-1, index)  # [..., 1]
    alpha_label = None
    if alpha is not None:
        alpha_label = alpha.expand_as(z).gather(-1, index) if alpha.dim() else alpha

    def terms(x: Tensor, positive: bool, a: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if label_smoothing:
            t = 1 - label_smoothing / 2 if positive else label_smoothing / 2
            return focal_terms(x, t, a, gamma, needs[0])
        return hard_terms(x, positive, a, gamma, needs[0])

    loss, grad = terms(z, False, alpha)  # every element as a negative: [..., C]
    pos_loss, pos_grad = terms(z_label, True, alpha_label)  # [..., 1]
    neg_loss_label, neg_grad_label = terms(z_label, False, alpha_label)  # [..., 1]

    # The divisor of "mean" (non-ignored elements) and any normaliser are known from the
    # labels before the loss, so they scale the gradient in the same pass that writes it.
    count = (valid.sum() * num_classes).to(z.dtype).clamp(min=1) if reduction == "mean" else None
    divisor = combine_divisors(count, normalizer)
    row_scale = valid_f if divisor is None else valid_f / divisor  # [..., 1]: 0 on ignored rows
    if grad is not None:
        assert pos_grad is not None and neg_grad_label is not None
        grad = grad.mul_(row_scale).scatter_(-1, index, torch.where(is_pos, pos_grad, neg_grad_label) * row_scale)
    grad_alpha = None
    if needs[1] and alpha is not None:
        t = torch.zeros_like(z).scatter_(-1, index, is_pos.to(z.dtype))  # one-hot; background, ignored rows 0
        if label_smoothing:
            t = t * (1 - label_smoothing) + label_smoothing / 2
        grad_alpha = focal_target_grads(z, t, alpha, gamma, False, True)[1] * row_scale
    if reduction == "none":
        loss = loss.mul_(valid_f).scatter_(-1, index, torch.where(is_pos, pos_loss, neg_loss_label) * valid_f)
        return loss, (grad, grad_alpha)
    # "sum"/"mean": the label column's negative term is selected out inside the reduction, which
    # torch.compile fuses into the pass that computes the loss: no logits-sized loss tensor, and no
    # inf - inf at an infinite logit, as subtracting it afterwards would give.
    label_column = (torch.arange(num_classes, device=z.device) == index) & is_pos  # [..., C]
    total = (torch.where(label_column, 0, loss) * valid_f).sum() + (torch.where(is_pos, pos_loss, 0) * valid_f).sum()
    return (total if divisor is None else total / divisor), (grad, grad_alpha)


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: AlphaLike = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    ignore_index: int = -1,
    label_smoothing: float = 0.0,
    normalizer: Tensor | float | None = None,
) -> Tensor:
    """Sigmoid focal loss, FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) (Lin et al. 2017, eq. 5).

    A drop-in for ``torchvision.ops.sigmoid_focal_loss`` (same positional order and the same
    values on float targets) that also takes integer class labels without a one-hot.

    Args:
        logits: float ``[..., C]`` (fp16/bf16 are computed in fp32; fp64 stays fp64).
        targets: either float, same shape as ``logits`` (0/1 or soft in [0, 1]); or integer
            class indices of shape ``logits.shape[:-1]``: c in [0, C) is class c, C is
            background (all classes negative), ``ignore_index`` ignores the whole row.
        alpha: weight of positives in [0, 1] (negatives get 1 - alpha); -1 or None for no
            weighting; a length-C sequence/tensor (per class); or a tensor of shape
            ``logits.shape[:-1]`` (per row, e.g. from :func:`alpha_from_object_counts`).
        gamma: focusing parameter, any finite real >= 0.
        reduction: "none" (``[..., C]``, ignored rows zero), "sum", or "mean" (over the
            non-ignored elements, i.e. non-ignored rows * C; an all-ignored input gives 0).
        ignore_index: integer label of rows to ignore (integer targets only).
        label_smoothing: eps in [0, 1]; targets become t (1 - eps) + eps / 2.
        normalizer: "sum" and "mean" only: a positive number (or a one-element tensor
            without gradient) the reduced loss is divided by, such as a detector's positive
            count; checked in the compute dtype (fp32 for half logits). Same value as
            dividing the result, but the division happens inside the loss's own kernel,
            so a plain ``loss.backward()`` makes no pass over the gradient.

    Returns:
        The loss in fp32 (fp64 for fp64 logits). Its gradient flows back in the logits'
        dtype: for fp16/bf16 it is the fp32 gradient times the upstream gradient (the loss
        scale included), rounded once. Float targets and alpha tensors that require grad
        get their gradients too (soft-target distillation, learned alpha). An infinite
        logit gives the limits of the loss (inf where that is inf) and of its gradient; an
        ignored row may hold any logit, NaN included, and gets loss 0 and gradient 0. A
        backward with ``create_graph=True`` gives second derivatives; it needs the logits
        alive at that backward (see :func:`~detfocal.losses.double_backward`).

    Raises:
        ValueError: non-floating logits or C = 0, targets of neither form, float targets
            outside [0, 1] or NaN, labels outside [0, C] other than ``ignore_index``
            (compared as their values, also for unsigned dtypes), gamma not a finite real
            >= 0, alpha out of range, of the wrong type or shape, an unknown reduction, or a
            normalizer that is not a finite number > 0 or comes with reduction "none".

    Example:
        >>> logits = torch.randn(2, 100, 80, requires_grad=True)
        >>> labels = torch.full((2, 100), 80)          # all background ...
        >>> labels[:, :3] = torch.tensor([5, 17, -1])   # ... two positives, one ignored
        >>> loss = sigmoid_focal_loss(logits, labels, reduction="sum")
        >>> loss.backward()
    """
    checks.check_logits(logits)
    checks.check_reduction(reduction)
    gamma = checks.check_gamma(gamma)
    label_smoothing = checks.check_smoothing(label_smoothing)
    if not isinstance(targets, Tensor):
        raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    dtype = checks.compute_dtype(logits)
    alpha_t = checks.alpha_tensor(alpha, logits, dtype)
    normalizer_t = checks.normalizer_tensor(normalizer, reduction, logits, dtype)

    if targets.is_floating_point():
        if targets.shape != logits.shape:
            raise ValueError(
                f"targets with a float dtype must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(targets.shape)}; integer class labels take shape {tuple(logits.shape[:-1])}")
        checks.check_unit_interval(targets, "targets")
        float_fn = select_backend(focal_float_targets, logits)

        def soft_fn(z: Tensor, t: Tensor, a: Tensor | None, needs: tuple[bool, ...]) -> LossAndGrads:
            return float_fn(z.to(dtype), t, a, gamma, reduction, label_smoothing, normalizer_t, needs)

        return saved_grad_loss(soft_fn, logits, targets, alpha_t)
    if targets.dtype not in checks.INT_DTYPES:
        raise ValueError(f"targets must be a float tensor of shape {tuple(logits.shape)} or an integer tensor of "
                         f"shape {tuple(logits.shape[:-1])}, got dtype {targets.dtype}")
    labels = checks.check_int_labels(targets, logits, ignore_index)
    int_fn = select_backend(focal_int_targets, logits)

    def label_fn(z: Tensor, a: Tensor | None, needs: tuple[bool, ...]) -> LossAndGrads:
        return int_fn(z.to(dtype), labels, a, gamma, reduction, ignore_index, label_smoothing, normalizer_t, needs)

    return saved_grad_loss(label_fn, logits, alpha_t)


class SigmoidFocalLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`sigmoid_focal_loss` with the same arguments."""

    def __init__(self, alpha: AlphaLike = 0.25, gamma: float = 2.0, reduction: str = "none",
                 ignore_index: int = -1, label_smoothing: float = 0.0) -> None:
        super().__init__()
        checks.check_reduction(reduction)
        self.alpha = alpha
        self.gamma = checks.check_gamma(gamma)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = checks.check_smoothing(label_smoothing)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return sigmoid_focal_loss(logits, targets, self.alpha, self.gamma, self.reduction,
                                  ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"
