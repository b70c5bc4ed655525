"""Sigmoid and softmax focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection").

Both losses compute their gradient analytically in the forward pass and save only that
gradient for backward (NVIDIA apex's pattern), so backward is a single multiply and at
most one logits-sized tensor stays alive between forward and backward.

Why analytic: autograd differentiates ``(1 - p_t) ** gamma`` into ``gamma * (1 - p_t) **
(gamma - 1)``, which is ``inf`` at saturated logits when gamma < 1 and turns into NaN
gradients (torchvision, fvcore, mmdet's python path). The closed form below has no
negative power, so it is finite for every gamma >= 0 and every logit.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checks
from .checks import AlphaLike
from .compile import select_backend


# --------------------------------------------------------------------------------------
# Elementwise math. Written once and shared by the eager path and the torch.compile path.
# --------------------------------------------------------------------------------------
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
    # CE = t * softplus(-z) + (1 - t) * softplus(z): accurate on both sides of 0.
    sp_pos = F.softplus(-z)
    sp_neg = F.softplus(z)
    ce = t * sp_pos + (1 - t) * sp_neg
    q = t * p_neg + (1 - t) * p
    weight = q.pow(gamma)
    if alpha is not None:
        weight = weight * (alpha * t + (1 - alpha) * (1 - t))
    loss = weight * ce
    if not need_grad:
        return loss, None
    # r -> 0 where q underflows to 0; there q**gamma is 0 too (gamma > 0) or gamma is 0.
    r = torch.where(q > 0, p * p_neg / q, torch.zeros_like(q)).clamp(max=1.0)
    grad = weight * ((p - t) + gamma * r * (1 - 2 * t) * ce)
    return loss, grad


def _reduce(loss: Tensor, grad: Tensor | None, reduction: str, count: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if reduction == "sum":
        return loss.sum(), grad
    if reduction == "mean":
        denom = torch.as_tensor(loss.numel(), dtype=loss.dtype, device=loss.device) if count is None else count
        denom = denom.clamp(min=1)
        return loss.sum() / denom, None if grad is None else grad / denom
    return loss, grad


def focal_float_targets(z: Tensor, targets: Tensor, alpha: Tensor | None, gamma: float, reduction: str,
                        label_smoothing: float, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Float (soft or one-hot) targets, same shape as ``z``."""
    t = targets.to(z.dtype)
    if label_smoothing:
        t = t * (1 - label_smoothing) + label_smoothing / 2
    loss, grad = focal_terms(z, t, alpha, gamma, need_grad)
    return _reduce(loss, grad, reduction, None)


def hard_terms(z: Tensor, positive: bool, alpha: Tensor | None, gamma: float,
               need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """:func:`focal_terms` for an exact 0/1 target, from one exp and one log1p per element.

    With the signed logit s = z (positive) or -z (negative), p_t = sigmoid(s), q = 1 - p_t:
        loss = alpha_t q^gamma softplus(-s),
        dloss/ds = -alpha_t q^gamma (gamma p_t softplus(-s) + q),   dloss/dz = +-dloss/ds.
    """
    s = z if positive else -z
    e = torch.exp(-s.abs())
    ce = (-s).clamp(min=0) + torch.log1p(e)  # softplus(-s) = -log p_t
    inv = 1.0 / (1.0 + e)
    nonneg = s >= 0
    p_t = torch.where(nonneg, inv, e * inv)
    q = torch.where(nonneg, e * inv, inv)
    weight = q.pow(gamma)
    if alpha is not None:
        weight = weight * (alpha if positive else 1 - alpha)
    loss = weight * ce
    if not need_grad:
        return loss, None
    grad_s = weight * (gamma * p_t * ce + q)
    return loss, (-grad_s if positive else grad_s)


def focal_int_targets(z: Tensor, labels: Tensor, alpha: Tensor | None, gamma: float, reduction: str,
                      ignore_index: int, label_smoothing: float, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Integer labels ``[...]``: c in [0, C) positive for class c, C background, ignore_index ignored.

    No one-hot: every element is computed as a negative, then the one positive column of
    each foreground row is recomputed from a gather ([...] elements) and corrected: for
    "sum"/"mean" the correction is added to the total, for "none" and the gradient it is
    scattered in place.
    """
    num_classes = z.shape[-1]
    valid = labels != ignore_index
    is_pos = (valid & (labels >= 0) & (labels < num_classes)).unsqueeze(-1)  # [..., 1]
    index = torch.where(is_pos.squeeze(-1), labels, torch.zeros_like(labels)).unsqueeze(-1)  # [..., 1]
    valid_f = valid.unsqueeze(-1).to(z.dtype)  # [..., 1]
    z_label = z.gather(-1, index)  # [..., 1]
    alpha_label = None
    if alpha is not None:
        alpha_label = alpha.expand_as(z).gather(-1, index) if alpha.dim() else alpha

    def terms(x: Tensor, positive: bool, a: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if label_smoothing:
            t = 1 - label_smoothing / 2 if positive else label_smoothing / 2
            return focal_terms(x, t, a, gamma, need_grad)
        return hard_terms(x, positive, a, gamma, need_grad)

    loss, grad = terms(z, False, alpha)  # every element as a negative: [..., C]
    pos_loss, pos_grad = terms(z_label, True, alpha_label)  # [..., 1]
    neg_loss_label, neg_grad_label = terms(z_label, False, alpha_label)  # [..., 1]

    if grad is not None:
        assert pos_grad is not None and neg_grad_label is not None
        grad = grad.mul_(valid_f).scatter_(-1, index, torch.where(is_pos, pos_grad, neg_grad_label) * valid_f)
    if reduction == "none":
        loss = loss.mul_(valid_f).scatter_(-1, index, torch.where(is_pos, pos_loss, neg_loss_label) * valid_f)
        return loss, grad
    correction = torch.where(is_pos, pos_loss - neg_loss_label, torch.zeros_like(pos_loss))
    total = (loss * valid_f).sum() + correction.sum()
    if reduction == "sum":
        return total, grad
    count = (valid.sum() * num_classes).to(z.dtype).clamp(min=1)
    return total / count, None if grad is None else grad / count


# --------------------------------------------------------------------------------------
# Autograd glue: forward runs the (eager or compiled) math, backward is one multiply.
# --------------------------------------------------------------------------------------
class _SavedGradFunction(torch.autograd.Function):
    """Wraps ``fn(z, need_grad) -> (loss, dloss/dz)``; saves only dloss/dz, in the logits' dtype.

    For a scalar loss, the first backward scales the saved gradient in place and hands it
    on: no new logits-sized allocation, which on CPU costs as much as the multiply itself.
    It records the scale it applied, so a later backward through the same graph
    (``retain_graph``, ``gradcheck``) rescales by the ratio, out of place.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, fn: Callable[[Tensor, bool], tuple[Tensor, Tensor | None]]) -> Tensor:  # type: ignore[override]
        need_grad = ctx.needs_input_grad[0]
        loss, grad = fn(logits, need_grad)
        ctx.applied_scale = None
        # Kept as a plain attribute, not save_for_backward: backward updates it in place, and it
        # is an intermediate (never an input or output), so no version-counter check is needed.
        ctx.grad = grad.to(logits.dtype) if need_grad and grad is not None else None
        return loss

    @staticmethod
    def _scale(ctx, grad_output: Tensor) -> Tensor:
        grad = ctx.grad
        if grad_output.numel() != 1:
            return grad * grad_output.to(grad.dtype)
        scale = grad_output.reshape(()).to(grad.dtype)
        previous = ctx.applied_scale
        if previous is None:
            ctx.applied_scale = scale
            return grad.mul_(scale)
        # A second backward (retain_graph, gradcheck): out of place, so the gradient handed
        # out the first time is not changed under the caller. A zero first scale wiped the
        # buffer, which cannot be undone.
        if previous.device.type == "cpu":
            if previous.item() == 0.0:
                raise RuntimeError("detfocal focal loss: cannot backpropagate again through a graph whose "
                                   "first backward scaled the loss by 0")
        else:
            torch._assert_async(previous != 0, "detfocal focal loss: second backward after a zero scale")
        return grad * (scale / previous)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _SavedGradFunction._scale(ctx, grad_output), None


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: AlphaLike = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    ignore_index: int = -1,
    label_smoothing: float = 0.0,
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
        gamma: focusing parameter, any real >= 0.
        reduction: "none" (``[..., C]``, ignored rows zero), "sum", or "mean" (over the
            non-ignored elements, i.e. non-ignored rows * C; an all-ignored input gives 0).
        ignore_index: integer label of rows to ignore (integer targets only).
        label_smoothing: eps in [0, 1]; targets become t (1 - eps) + eps / 2.

    Returns:
        The loss in fp32 (fp64 for fp64 logits); its gradient flows back in the logits' dtype.

    Raises:
        ValueError: non-floating logits, targets of neither form, labels outside [0, C]
            other than ``ignore_index``, gamma < 0, alpha out of range or of the wrong
            shape, or an unknown reduction.

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

    if targets.is_floating_point():
        if targets.shape != logits.shape:
            raise ValueError(
                f"targets with a float dtype must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(targets.shape)}; integer class labels take shape {tuple(logits.shape[:-1])}")
        backend_fn = select_backend(focal_float_targets, logits)

        def fn(z: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
            return backend_fn(z.to(dtype), targets, alpha_t, gamma, reduction, label_smoothing, need_grad)
    elif targets.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        checks.check_int_labels(targets, logits, ignore_index)
        labels = targets.long()
        backend_fn = select_backend(focal_int_targets, logits)

        def fn(z: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
            return backend_fn(z.to(dtype), labels, alpha_t, gamma, reduction, ignore_index, label_smoothing, need_grad)
    else:
        raise ValueError(f"targets must be a float tensor of shape {tuple(logits.shape)} or an integer tensor of "
                         f"shape {tuple(logits.shape[:-1])}, got dtype {targets.dtype}")

    if logits.requires_grad and torch.is_grad_enabled():
        return _SavedGradFunction.apply(logits, fn)
    return fn(logits, False)[0]


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


# --------------------------------------------------------------------------------------
# Softmax focal loss: the multi-class variant, with (1 - p_t)^gamma applied per sample.
# --------------------------------------------------------------------------------------
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
    ratio = torch.where(u.unsqueeze(-1) > 0, -p / u.unsqueeze(-1), torch.zeros_like(p)).clamp(-1.0, 0.0)
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

    The seed snippets applied (1 - p)^gamma to the batch-mean cross entropy, which is not
    a focal loss: here the factor multiplies each sample's own term.

    Args:
        logits: float ``[..., C]``.
        target: integer class indices of shape ``logits.shape[:-1]``, in [0, C) or ``ignore_index``.
        alpha: None, or a per-class sequence/tensor of C weights (``F.cross_entropy``'s ``weight``).
        gamma: focusing parameter >= 0; gamma = 0 is exactly cross entropy.
        reduction: "none" (per-sample ``[...]``), "sum", or "mean", which, like
            ``F.cross_entropy``, divides by the sum of alpha_t over the non-ignored targets.
        ignore_index: target value to ignore.
        label_smoothing: eps in [0, 1], as in ``F.cross_entropy``.

    Returns:
        The loss in fp32 (fp64 for fp64 logits).

    Raises:
        ValueError: on bad logits, target shape or values, gamma, alpha or reduction.

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
    checks.check_int_labels(target, logits, ignore_index, "target", background_ok=False)
    dtype = checks.compute_dtype(logits)
    num_classes = logits.shape[-1]
    alpha_t = None
    if alpha is not None:
        alpha_t = torch.as_tensor(alpha, dtype=dtype, device=logits.device)
        if alpha_t.shape != (num_classes,):
            raise ValueError(f"alpha must be None or a per-class sequence of length C = {num_classes}, "
                             f"got shape {tuple(alpha_t.shape)}")
    target = target.long()

    def fn(z: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        loss, a_t, grad = _softmax_focal(z.to(dtype), target, alpha_t, gamma, ignore_index, label_smoothing, need_grad)
        if reduction == "none":
            return loss, grad
        if reduction == "sum":
            return loss.sum(), grad
        # F.cross_entropy gives NaN when everything is ignored; 0 is the useful answer here.
        denom = a_t.sum().clamp(min=torch.finfo(dtype).tiny)
        return loss.sum() / denom, None if grad is None else grad / denom

    if logits.requires_grad and torch.is_grad_enabled():
        if reduction == "none":
            # Per-row losses: the saved gradient is per row, so scale by grad_output[..., None].
            return _RowwiseSavedGrad.apply(logits, fn)
        return _SavedGradFunction.apply(logits, fn)
    return fn(logits, False)[0]


class _RowwiseSavedGrad(_SavedGradFunction):
    """Like :class:`_SavedGradFunction` for a loss of shape ``logits.shape[:-1]``."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _SavedGradFunction._scale(ctx, grad_output.unsqueeze(-1)), None
