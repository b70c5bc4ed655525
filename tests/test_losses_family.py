"""The focal-loss family (detfocal.losses.family), label smoothing, and the focal-loss figures.

Each loss is checked against an independent float64 formula written here with plain torch
ops (or against torch.nn.functional), plus its degenerate cases.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detfocal.losses import (alpha_from_object_counts, binary_cross_entropy_with_probs, double_backward,
                             focal_cosine_loss, focal_loss_with_probs, nll_loss_with_probs, quality_focal_loss,
                             sigmoid_focal_loss, sigmoid_focal_loss_star, softmax_focal_loss, varifocal_loss)

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
REDUCTIONS = ("none", "sum", "mean")


# --------------------------------------------------------------------------------------
# Independent float64 references.
# --------------------------------------------------------------------------------------
def one_hot_rows(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense 0/1 targets (background C and ignored rows all zero) and the kept-row mask."""
    kept = labels != -1
    dense = torch.zeros(*labels.shape, num_classes, dtype=F64)
    for idx in zip(*torch.nonzero((labels >= 0) & (labels < num_classes), as_tuple=True)):
        dense[idx + (labels[idx],)] = 1.0
    return dense, kept


def focal_ref(x: torch.Tensor, t: torch.Tensor, alpha: float | None, gamma: float) -> torch.Tensor:
    """torchvision's definition: alpha_t (1 - p_t)^gamma BCE, p_t = p t + (1 - p)(1 - t)."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    loss = ce * (1 - (p * t + (1 - p) * (1 - t))) ** gamma
    return loss if alpha is None else loss * (alpha * t + (1 - alpha) * (1 - t))


def softmax_focal_ref(x: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor | None, gamma: float,
                      eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (1 - p_t)^gamma H and alpha_t (0 on ignored rows), H the smoothed, weighted CE of F.cross_entropy.

    H = (1 - eps) alpha_t (-log p_t) + eps / C sum_j alpha_j (-log p_j).
    """
    kept = target != -100
    index = target.clamp(min=0)
    alpha = torch.ones(x.shape[-1], dtype=x.dtype) if alpha is None else alpha
    log_p = torch.log(torch.softmax(x, -1))
    log_pt = log_p.gather(-1, index[:, None])[:, 0]
    a_t = torch.where(kept, alpha[index], 0.0)
    h = -(1 - eps) * a_t * log_pt - eps / x.shape[-1] * (alpha * log_p).sum(-1) * kept
    return (1 - log_pt.exp()) ** gamma * h, a_t


def reduce_ref(loss: torch.Tensor, reduction: str, count: float | None = None) -> torch.Tensor:
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / (loss.numel() if count is None else count)


def labels_with_background_and_ignore(shape: tuple[int, ...], num_classes: int) -> torch.Tensor:
    labels = torch.randint(0, num_classes + 1, shape)
    labels.view(-1)[:3] = torch.tensor([num_classes, -1, 0])
    return labels


# --------------------------------------------------------------------------------------
# Probability inputs.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_loss_with_probs_gamma0_is_binary_cross_entropy(reduction: str) -> None:
    probs = torch.rand(4, 6, 3, dtype=F64) * 0.98 + 0.01
    for targets in (torch.randint(0, 2, probs.shape).to(F64), torch.rand(probs.shape, dtype=F64)):
        expected = F.binary_cross_entropy(probs, targets, reduction=reduction)
        got = focal_loss_with_probs(probs, targets, alpha=None, gamma=0.0, reduction=reduction)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(binary_cross_entropy_with_probs(probs, targets, reduction=reduction), expected)


def test_focal_loss_with_probs_equals_the_logit_version_and_the_formula() -> None:
    x = torch.rand(5, 7, 4, dtype=F64) * 12 - 6
    targets = torch.rand(x.shape, dtype=F64)
    got = focal_loss_with_probs(torch.sigmoid(x), targets, alpha=0.25, gamma=2.0)
    torch.testing.assert_close(got, focal_ref(x, targets, 0.25, 2.0))
    torch.testing.assert_close(got, sigmoid_focal_loss(x, targets, alpha=0.25, gamma=2.0))
    labels = labels_with_background_and_ignore((5, 7), 4)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(focal_loss_with_probs(torch.sigmoid(x), labels, gamma=0.5, reduction=reduction),
                                   sigmoid_focal_loss(x, labels, gamma=0.5, reduction=reduction))


def test_focal_loss_with_probs_clamps_probs_to_eps() -> None:
    eps = 1e-3
    probs = torch.tensor([[0.0], [eps], [1 - eps], [1.0], [0.5]], dtype=F64, requires_grad=True)
    targets = torch.tensor([[1.0], [1.0], [0.0], [0.0], [1.0]], dtype=F64)
    loss = focal_loss_with_probs(probs, targets, alpha=None, gamma=2.0, eps=eps)[:, 0]
    torch.testing.assert_close(loss[0], loss[1])  # p = 0 is read as p = eps ...
    torch.testing.assert_close(loss[2], loss[3])  # ... and p = 1 as 1 - eps
    torch.testing.assert_close(loss[0].detach(), torch.tensor(-math.log(eps) * (1 - eps) ** 2, dtype=F64))
    loss.sum().backward()
    assert probs.grad[0] == 0 and probs.grad[3] == 0  # flat outside the clamp
    assert torch.isfinite(probs.grad).all() and probs.grad[4] != 0


def test_focal_loss_with_probs_keeps_fp16_gradient_finite_below_eps_floor() -> None:
    # -log p has slope 1/p: 1e5 at p = 1e-5 overflows fp16, so the clamp is raised to ~6.1e-5 there.
    probs = torch.tensor([[1e-5, 1e-7, 0.0, 0.3]], dtype=torch.float16, requires_grad=True)
    focal_loss_with_probs(probs, torch.ones(1, 4, dtype=torch.float16), gamma=0.5, reduction="sum").backward()
    assert torch.isfinite(probs.grad).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_cross_entropy_with_probs_index_targets_equal_one_hot(reduction: str) -> None:
    probs = torch.rand(6, 5, 3, dtype=F64) * 0.98 + 0.01
    labels = labels_with_background_and_ignore((6, 5), 3)
    dense, kept = one_hot_rows(labels, 3)
    expected = F.binary_cross_entropy(probs, dense, reduction="none") * kept[..., None]
    got = binary_cross_entropy_with_probs(probs, labels, reduction=reduction)
    torch.testing.assert_close(got, reduce_ref(expected, reduction, kept.sum().item() * 3))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss_with_probs_equals_nll_of_log_probs(reduction: str) -> None:
    probs = torch.softmax(torch.randn(9, 4, dtype=F64), -1)
    target = torch.randint(0, 4, (9,))
    target[2] = -100
    expected = F.nll_loss(torch.log(probs), target, reduction=reduction)
    torch.testing.assert_close(nll_loss_with_probs(probs, target, reduction=reduction), expected)
    kept = target != -100
    one_hot = F.one_hot(target[kept], 4).to(F64)
    torch.testing.assert_close(nll_loss_with_probs(probs[kept], one_hot, reduction=reduction),
                               F.nll_loss(torch.log(probs[kept]), target[kept], reduction=reduction))


def test_nll_loss_with_probs_zero_probability_and_all_ignored_are_finite() -> None:
    probs = torch.tensor([[0.0, 1.0], [0.5, 0.5]], dtype=F64, requires_grad=True)
    loss = nll_loss_with_probs(probs, torch.tensor([0, 1]), reduction="none", eps=1e-6)
    torch.testing.assert_close(loss, torch.tensor([-math.log(1e-6), math.log(2)], dtype=F64))
    loss.sum().backward()
    assert torch.isfinite(probs.grad).all()
    assert nll_loss_with_probs(probs, torch.tensor([-100, -100])).item() == 0.0


# --------------------------------------------------------------------------------------
# Label smoothing of the sigmoid and softmax focal losses (focal.py).
# --------------------------------------------------------------------------------------
def test_sigmoid_label_smoothing_zero_means_no_smoothing() -> None:
    x = torch.randn(4, 5, 3, dtype=F64)
    labels = labels_with_background_and_ignore((4, 5), 3)
    dense, _ = one_hot_rows(labels, 3)
    for targets in (dense, labels):
        torch.testing.assert_close(sigmoid_focal_loss(x, targets, label_smoothing=0.0), sigmoid_focal_loss(x, targets))
    torch.testing.assert_close(sigmoid_focal_loss(x, dense, label_smoothing=0.0), focal_ref(x, dense, 0.25, 2.0))


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_sigmoid_label_smoothing_applies_focal_factor_once(eps: float) -> None:
    x = (torch.randn(4, 5, 3, dtype=F64) * 3).requires_grad_()
    labels = labels_with_background_and_ignore((4, 5), 3)
    dense, kept = one_hot_rows(labels, 3)
    expected = focal_ref(x, dense * (1 - eps) + eps / 2, 0.25, 2.0)
    torch.testing.assert_close(sigmoid_focal_loss(x, dense, label_smoothing=eps), expected)
    got = sigmoid_focal_loss(x, labels, label_smoothing=eps, reduction="sum")
    expected_sum = (expected * kept[..., None]).sum()
    torch.testing.assert_close(got, expected_sum)
    # The analytic gradient includes smoothing the same way autograd of the formula does.
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(expected_sum, x)[0])


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softmax_label_smoothing_gamma0_is_cross_entropy(eps: float, reduction: str) -> None:
    x = torch.randn(8, 5, dtype=F64)
    target = torch.randint(0, 5, (8,))
    target[1] = -100
    weight = torch.rand(5, dtype=F64) + 0.5
    expected = F.cross_entropy(x, target, weight=weight, reduction=reduction, label_smoothing=eps)
    got = softmax_focal_loss(x, target, alpha=weight, gamma=0.0, reduction=reduction, label_smoothing=eps)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_softmax_label_smoothing_matches_float64_formula(eps: float) -> None:
    x = (torch.randn(8, 5, dtype=F64) * 3).requires_grad_()
    target = torch.randint(0, 5, (8,))
    target[0] = -100
    alpha = torch.rand(5, dtype=F64)
    expected, a_t = softmax_focal_ref(x, target, alpha, 2.0, eps)
    got = softmax_focal_loss(x, target, alpha=alpha, gamma=2.0, reduction="none", label_smoothing=eps)
    torch.testing.assert_close(got, expected)
    mean = softmax_focal_loss(x, target, alpha=alpha, gamma=2.0, label_smoothing=eps)
    torch.testing.assert_close(mean, expected.sum() / a_t.sum())
    torch.testing.assert_close(torch.autograd.grad(mean, x)[0], torch.autograd.grad(expected.sum() / a_t.sum(), x)[0])
    if eps == 0.0:
        torch.testing.assert_close(got, softmax_focal_loss(x, target, alpha=alpha, gamma=2.0, reduction="none"))


# --------------------------------------------------------------------------------------
# FL* (paper appendix).
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma,beta", [(2.0, 1.0), (4.0, 0.0), (0.5, -0.5)])
@pytest.mark.parametrize("alpha", [-1, 0.25])
def test_fl_star_matches_paper_formula(gamma: float, beta: float, alpha: float) -> None:
    x = torch.randn(4, 6, 3, dtype=F64) * 4
    t = torch.randint(0, 2, x.shape).to(F64)
    x_t = torch.where(t == 1, x, -x)
    expected = -torch.log(torch.sigmoid(gamma * x_t + beta)) / gamma
    if alpha >= 0:
        expected = expected * torch.where(t == 1, alpha, 1 - alpha)
    torch.testing.assert_close(sigmoid_focal_loss_star(x, t, gamma, beta, alpha), expected)
    # Integer labels equal their one-hot; soft targets mix the two cases linearly.
    labels = labels_with_background_and_ignore((4, 6), 3)
    dense, kept = one_hot_rows(labels, 3)
    got = sigmoid_focal_loss_star(x, labels, gamma, beta, alpha, reduction="mean")
    full = sigmoid_focal_loss_star(x, dense, gamma, beta, alpha)
    torch.testing.assert_close(got, (full * kept[..., None]).sum() / (kept.sum() * 3))
    soft = torch.rand(x.shape, dtype=F64)
    mixed = (soft * sigmoid_focal_loss_star(x, torch.ones_like(x), gamma, beta, -1)
             + (1 - soft) * sigmoid_focal_loss_star(x, torch.zeros_like(x), gamma, beta, -1))
    torch.testing.assert_close(sigmoid_focal_loss_star(x, soft, gamma, beta, -1), mixed)


@pytest.mark.parametrize("gamma", [0.0, -1.0, float("nan")])
def test_fl_star_rejects_gamma_not_positive(gamma: float) -> None:
    with pytest.raises(ValueError, match="gamma"):
        sigmoid_focal_loss_star(torch.randn(2, 3), torch.zeros(2, 3), gamma=gamma)


# --------------------------------------------------------------------------------------
# Dynamic alpha from object counts.
# --------------------------------------------------------------------------------------
def test_alpha_from_object_counts_values() -> None:
    torch.testing.assert_close(alpha_from_object_counts(torch.tensor([1, 3, 8])), torch.tensor([0.25, 0.75, 1.0]))
    torch.testing.assert_close(alpha_from_object_counts([2.0, 2.0]), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(alpha_from_object_counts([0, 0, 0]), torch.zeros(3))  # no positives: 0, not NaN
    torch.testing.assert_close(alpha_from_object_counts([0, 4]), torch.tensor([0.0, 1.0]))
    assert alpha_from_object_counts(torch.tensor([1.0, 2.0], dtype=F64)).dtype == F64


def test_alpha_from_object_counts_weights_each_image_in_sigmoid_focal_loss() -> None:
    x = torch.randn(3, 5, 4, dtype=F64, requires_grad=True)
    labels = labels_with_background_and_ignore((3, 5), 4)
    dense, kept = one_hot_rows(labels, 4)
    alpha = alpha_from_object_counts(torch.tensor([1, 2, 9])).to(F64)
    expected = torch.stack([focal_ref(x[i], dense[i], alpha[i].item(), 2.0) for i in range(3)]) * kept[..., None]
    got = sigmoid_focal_loss(x, labels, alpha=alpha[:, None, None])
    torch.testing.assert_close(got, expected)
    # The same alpha as an explicit per-row tensor of shape logits.shape[:-1].
    torch.testing.assert_close(sigmoid_focal_loss(x, labels, alpha=alpha[:, None].expand(3, 5)), expected)
    total = sigmoid_focal_loss(x, labels, alpha=alpha[:, None, None], reduction="sum")
    torch.testing.assert_close(torch.autograd.grad(total, x)[0], torch.autograd.grad(expected.sum(), x)[0])


# --------------------------------------------------------------------------------------
# Focal cosine loss.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_cosine_loss_is_cosine_embedding_plus_softmax_focal(reduction: str) -> None:
    x = torch.randn(7, 5, dtype=F64) * 2
    target = torch.randint(0, 5, (7,))
    target[3] = -100
    alpha = torch.rand(5, dtype=F64) + 0.1
    kept = target != -100
    one_hot = F.one_hot(target[kept], 5).to(F64)
    cosine = F.cosine_embedding_loss(x[kept], one_hot, torch.ones(int(kept.sum()), dtype=F64), reduction="none")
    focal, a_t = softmax_focal_ref(x, target, alpha, 1.5)
    got = focal_cosine_loss(x, target, gamma=1.5, alpha=alpha, reduction=reduction, cosine_weight=0.7)
    if reduction == "none":
        torch.testing.assert_close(got[kept], 0.7 * cosine + focal[kept])
        assert got[3] == 0
    elif reduction == "sum":
        torch.testing.assert_close(got, 0.7 * cosine.sum() + focal.sum())
    else:
        torch.testing.assert_close(got, 0.7 * cosine.mean() + focal.sum() / a_t.sum())


def test_focal_cosine_loss_zero_logits_have_finite_gradient() -> None:
    x = torch.zeros(2, 4, requires_grad=True)
    loss = focal_cosine_loss(x, torch.tensor([1, 2]))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(1 + math.log(4) * 0.75))  # cos = 0, p_t = 1/4, gamma = 1
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------
# Quality focal loss and varifocal loss.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_qfl_with_binary_scores_equals_sigmoid_focal_loss(beta: float, reduction: str) -> None:
    x = (torch.randn(4, 6, 3, dtype=F64) * 4).requires_grad_()
    labels = labels_with_background_and_ignore((4, 6), 3)
    scores = torch.ones(4, 6, dtype=F64)
    scores[labels >= 3] = float("nan")  # read only on positive rows
    scores[labels == -1] = 7.0
    got = quality_focal_loss(x, labels, scores, beta=beta, reduction=reduction)
    expected = sigmoid_focal_loss(x, labels, alpha=-1, gamma=beta, reduction=reduction)
    torch.testing.assert_close(got, expected)
    grad_got, = torch.autograd.grad(got.sum(), x)
    grad_expected, = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad_got, grad_expected)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_qfl_matches_float64_formula(beta: float) -> None:
    x = (torch.randn(5, 4, 3, dtype=F64) * 3).requires_grad_()
    labels = labels_with_background_and_ignore((5, 4), 3)
    scores = torch.rand(5, 4, dtype=F64)
    dense, kept = one_hot_rows(labels, 3)
    y = dense * scores[..., None]
    expected = (F.binary_cross_entropy_with_logits(x, y, reduction="none")
                * (y - torch.sigmoid(x)).abs() ** beta * kept[..., None])
    got = quality_focal_loss(x, labels, scores, beta=beta, reduction="mean")
    mean = expected.sum() / (kept.sum() * 3)
    torch.testing.assert_close(got, mean)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(mean, x)[0])


def test_qfl_gradient_is_finite_where_prediction_equals_score() -> None:
    scores = torch.tensor([0.3, 0.75], dtype=F64)
    x = torch.zeros(2, 2, dtype=F64)
    x[:, 0] = torch.logit(scores)  # |y - p|^0.5 has a cusp here
    x.requires_grad_()
    loss = quality_focal_loss(x, torch.tensor([0, 0]), scores, beta=0.5, reduction="sum")
    loss.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("iou_weighted", [True, False])
def test_vfl_matches_float64_formula(gamma: float, iou_weighted: bool) -> None:
    x = (torch.randn(6, 4, dtype=F64) * 3).requires_grad_()
    q = torch.where(torch.rand(6, 4) < 0.3, torch.rand(6, 4, dtype=F64) * 0.9 + 0.1, 0.0)
    p = torch.sigmoid(x)
    pos_weight = q if iou_weighted else torch.ones_like(q)
    weight = torch.where(q > 0, pos_weight, 0.75 * p ** gamma)
    expected = weight * -(q * torch.log(p) + (1 - q) * torch.log(1 - p))
    got = varifocal_loss(x, q, gamma=gamma, iou_weighted=iou_weighted)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0])
    torch.testing.assert_close(varifocal_loss(x, q, gamma=gamma, iou_weighted=iou_weighted, reduction="mean"),
                               expected.mean())


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
def test_qfl_gives_the_limits_of_value_and_gradient_at_infinite_logits(beta: float) -> None:
    # At z = +inf (p = 1) d = 1 - y, at -inf (p = 0) d = -y; p (1 - p) / |d| -> 0, so dQFL/dz -> |d|^beta d,
    # and BCE -> inf unless y puts no weight on the saturated side.
    z = torch.tensor([[math.inf, -math.inf, math.inf], [-math.inf, math.inf, -math.inf]], dtype=F64,
                     requires_grad=True)
    scores = torch.tensor([0.3, 1.0], dtype=F64)
    loss = quality_focal_loss(z, torch.tensor([0, 1]), scores, beta=beta)
    loss.backward(torch.ones_like(loss))
    y = torch.tensor([[0.3, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64)
    p = (z.detach() > 0).to(F64)
    d = p - y
    saturated_weight = torch.where(p == 1, 1 - y, y)  # the BCE weight on the side that goes to inf
    value = torch.where(saturated_weight > 0, d.abs() ** beta * math.inf, 0.0)
    torch.testing.assert_close(loss.detach(), torch.where(d == 0, 0.0, value), rtol=1e-12, atol=0)
    torch.testing.assert_close(z.grad, d.abs() ** beta * d, rtol=1e-12, atol=0)


def test_vfl_gives_the_limits_of_value_and_gradient_at_infinite_logits() -> None:
    # Positives: q BCE -> inf unless q = 1 at +inf, d/dz -> q (p - q). Negatives: alpha p^gamma softplus(z)
    # -> inf at +inf and 0 at -inf, d/dz -> alpha p^gamma (gamma (1 - p) softplus(z) + p) -> alpha p.
    z = torch.tensor([[math.inf, -math.inf, math.inf], [-math.inf, math.inf, -math.inf]], dtype=F64,
                     requires_grad=True)
    q = torch.tensor([[0.3, 0.0, 1.0], [0.5, 0.0, 0.0]], dtype=F64)
    loss = varifocal_loss(z, q, alpha=0.75, gamma=2.0)
    loss.backward(torch.ones_like(loss))
    p = (z.detach() > 0).to(F64)
    expected = torch.tensor([[math.inf, 0.0, 0.0], [math.inf, math.inf, 0.0]], dtype=F64)
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(z.grad, torch.where(q > 0, q * (p - q), 0.75 * p), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------
# Gradients: finite at saturation, exact in float64.
# --------------------------------------------------------------------------------------
def saturated_cases(dtype: torch.dtype) -> dict[str, tuple]:
    """name -> (loss function of the leaf, leaf): logits 0, ±20, ±1e4 (probs 0 and 1 exactly)."""
    x = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 20.0], [-20.0, 1e4, -1e4]]).to(dtype)
    labels = torch.tensor([0, 2, 3])
    scores = torch.tensor([1.0, 0.5, 0.0])
    q = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.3, 0.0]])
    probs = torch.sigmoid(x.float()).to(dtype)
    return {
        "focal_loss_with_probs": (lambda p: focal_loss_with_probs(p, labels, gamma=0.5, reduction="sum"), probs),
        "binary_cross_entropy_with_probs": (lambda p: binary_cross_entropy_with_probs(p, labels), probs),
        "nll_loss_with_probs": (lambda p: nll_loss_with_probs(p, labels.clamp(max=2)), probs),
        "sigmoid_focal_loss_star": (lambda z: sigmoid_focal_loss_star(z, labels, gamma=0.5, reduction="sum"), x),
        "focal_cosine_loss": (lambda z: focal_cosine_loss(z, labels.clamp(max=2), gamma=0.5), x),
        "quality_focal_loss": (lambda z: quality_focal_loss(z, labels, scores, beta=0.5, reduction="sum"), x),
        "varifocal_loss": (lambda z: varifocal_loss(z, q, gamma=0.5, reduction="sum"), x),
        "sigmoid_smoothed": (lambda z: sigmoid_focal_loss(z, labels, gamma=0.5, label_smoothing=0.1,
                                                          reduction="sum"), x),
        "softmax_smoothed": (lambda z: softmax_focal_loss(z, labels.clamp(max=2), gamma=0.5,
                                                          label_smoothing=0.1), x),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(saturated_cases(torch.float32)))
def test_gradients_finite_at_saturated_inputs(dtype: torch.dtype, name: str) -> None:
    loss_fn, leaf = saturated_cases(dtype)[name]
    leaf = leaf.clone().requires_grad_()
    loss = loss_fn(leaf)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.backward()
    assert leaf.grad.dtype == dtype and torch.isfinite(leaf.grad).all()


def gradcheck_cases() -> dict[str, tuple]:
    labels = torch.tensor([[0, 2, 3], [-1, 1, 0]])
    scores = torch.tensor([[0.3, 0.9, 0.0], [0.0, 0.6, 1.0]], dtype=F64)
    q = torch.where(torch.rand(2, 3, 3) < 0.4, torch.rand(2, 3, 3, dtype=F64) * 0.9 + 0.1, 0.0)
    return {
        "qfl_beta0.5_none": lambda z: quality_focal_loss(z, labels, scores, beta=0.5),
        "qfl_beta2_mean": lambda z: quality_focal_loss(z, labels, scores, beta=2.0, reduction="mean"),
        "vfl_gamma0.5_none": lambda z: varifocal_loss(z, q, gamma=0.5),
        "vfl_gamma2_sum_unweighted": lambda z: varifocal_loss(z, q, iou_weighted=False, reduction="sum"),
        "fl_star": lambda z: sigmoid_focal_loss_star(z, labels, gamma=2.0, beta=1.0, reduction="mean"),
        "focal_loss_with_probs": lambda z: focal_loss_with_probs(torch.sigmoid(z), labels, gamma=0.5),
        "focal_cosine": lambda z: focal_cosine_loss(z.flatten(0, 1), labels.flatten().clamp(0, 2), alpha=[1, 2, 3.0]),
        "sigmoid_smoothed": lambda z: sigmoid_focal_loss(z, labels, gamma=0.5, label_smoothing=0.2),
        "softmax_smoothed": lambda z: softmax_focal_loss(z, labels.clamp(0, 2), gamma=0.5, label_smoothing=0.2,
                                                         reduction="none"),
    }


@pytest.mark.parametrize("name", list(gradcheck_cases()))
def test_gradcheck_float64(name: str) -> None:
    x = (torch.randn(2, 3, 3, dtype=F64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(gradcheck_cases()[name], (x,))


@pytest.mark.parametrize("name", list(gradcheck_cases()))
def test_gradgradcheck_float64(name: str) -> None:
    # create_graph through the saved-gradient losses recomputes their analytic gradient under
    # autograd; double_backward keeps intermediate logits (focal_cosine's flatten) alive for it.
    x = (torch.randn(2, 3, 3, dtype=F64) * 2).requires_grad_()
    with double_backward():
        assert torch.autograd.gradgradcheck(gradcheck_cases()[name], (x,))


def ignored_row_cases() -> dict[str, tuple]:
    """name -> (loss of logits [4, 3] and labels [4] with -1 ignored, reduced by "sum")."""
    scores = torch.tensor([0.3, 0.9, 0.0, 0.6], dtype=F64)
    return {
        "quality_focal_loss": lambda z, labels: quality_focal_loss(z, labels, scores[:len(labels)], reduction="sum"),
        "sigmoid_focal_loss_star": lambda z, labels: sigmoid_focal_loss_star(z, labels, reduction="sum"),
        "focal_cosine_loss": lambda z, labels: focal_cosine_loss(z, labels, ignore_index=-1, reduction="sum"),
        "softmax_smoothed": lambda z, labels: softmax_focal_loss(z, labels, ignore_index=-1, label_smoothing=0.1,
                                                                 reduction="sum"),
    }


@pytest.mark.parametrize("name", list(ignored_row_cases()))
def test_non_finite_logits_on_ignored_rows_give_zero_loss_and_exactly_zero_gradient(name: str) -> None:
    loss_fn = ignored_row_cases()[name]
    logits = torch.randn(4, 3, dtype=F64) * 2
    logits[1] = torch.tensor([math.inf, -math.inf, math.nan], dtype=F64)
    labels = torch.tensor([0, -1, 2, 1])
    x = logits.clone().requires_grad_()
    loss = loss_fn(x, labels)
    loss.backward()
    kept = labels != -1
    x_kept = logits[kept].clone().requires_grad_()  # the reference never sees the ignored row
    expected = loss_fn(x_kept, labels[kept]) if name != "quality_focal_loss" else quality_focal_loss(
        x_kept, labels[kept], torch.tensor([0.3, 0.0, 0.6], dtype=F64), reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(x.grad[1], torch.zeros(3, dtype=F64))
    torch.testing.assert_close(x.grad[kept], x_kept.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["fl_star", "focal_loss_with_probs"])
def test_gradients_flow_into_soft_targets_and_alpha(name: str) -> None:
    x = (torch.randn(2, 3, 3, dtype=F64) * 2).requires_grad_()
    t = (torch.rand(2, 3, 3, dtype=F64) * 0.9 + 0.05).requires_grad_()
    a = torch.tensor([0.2, 0.5, 0.7], dtype=F64, requires_grad=True)
    loss_fn = {"fl_star": lambda x, t, a: sigmoid_focal_loss_star(x, t, 2.0, 1.0, a, "mean"),
               "focal_loss_with_probs": lambda x, t, a: focal_loss_with_probs(torch.sigmoid(x), t, a, 0.5)}[name]
    assert torch.autograd.gradcheck(loss_fn, (x, t, a))


# --------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument.
# --------------------------------------------------------------------------------------
P = torch.full((2, 3), 0.5)
X = torch.zeros(2, 3)
L = torch.tensor([0, 3])
S = torch.tensor([0.5, 0.0])
BAD_INPUTS = {
    "probs_out_of_range": ("probs", lambda: focal_loss_with_probs(P + 1, L)),
    "probs_integer": ("probs", lambda: focal_loss_with_probs(L[:, None].expand(2, 3), L)),
    "eps_zero": ("eps", lambda: focal_loss_with_probs(P, L, eps=0.0)),
    "eps_half": ("eps", lambda: binary_cross_entropy_with_probs(P, L, eps=0.5)),
    "gamma_negative": ("gamma", lambda: focal_loss_with_probs(P, L, gamma=-1.0)),
    "targets_shape": ("targets", lambda: focal_loss_with_probs(P, torch.zeros(2, 4))),
    "targets_out_of_range": ("targets", lambda: focal_loss_with_probs(P, torch.full((2, 3), 2.0))),
    "reduction": ("reduction", lambda: binary_cross_entropy_with_probs(P, L, reduction="avg")),
    "nll_target_label": ("target", lambda: nll_loss_with_probs(P, torch.tensor([0, 3]))),
    "nll_target_shape": ("target", lambda: nll_loss_with_probs(P, torch.zeros(3, 3))),
    "fl_star_beta": ("beta", lambda: sigmoid_focal_loss_star(X, L, beta=float("inf"))),
    "fl_star_alpha": ("alpha", lambda: sigmoid_focal_loss_star(X, L, alpha=2.0)),
    "fl_star_labels": ("targets", lambda: sigmoid_focal_loss_star(X, torch.tensor([0, 5]))),
    "num_objs_negative": ("num_objs", lambda: alpha_from_object_counts([-1, 2])),
    "num_objs_empty": ("num_objs", lambda: alpha_from_object_counts([])),
    "num_objs_2d": ("num_objs", lambda: alpha_from_object_counts([[1, 2]])),
    "num_objs_nan": ("num_objs", lambda: alpha_from_object_counts([1.0, float("nan")])),
    "num_objs_strings": (r"^num_objs holds \['a'\] \(list\), expected", lambda: alpha_from_object_counts(["a"])),
    "probs_alpha_enlarging": (r"^alpha .*logits' shape \(2, 3\).*alpha of shape \(2, 2, 3\)$",
                              lambda: focal_loss_with_probs(P, L, alpha=torch.full((2, 2, 3), 0.25))),
    "fl_star_alpha_enlarging": (r"^alpha .*alpha of shape \(4, 1, 3\)$",
                                lambda: sigmoid_focal_loss_star(X, L, alpha=torch.full((4, 1, 3), 0.25))),
    "cosine_weight": ("cosine_weight", lambda: focal_cosine_loss(X, L.clamp(max=2), cosine_weight=-1.0)),
    "cosine_target": ("target", lambda: focal_cosine_loss(X, L)),
    "cosine_gamma": ("gamma", lambda: focal_cosine_loss(X, L.clamp(max=2), gamma=-0.5)),
    "qfl_beta": ("beta", lambda: quality_focal_loss(X, L, S, beta=-1.0)),
    "qfl_labels_float": ("labels", lambda: quality_focal_loss(X, L.float(), S)),
    "qfl_labels_range": ("labels", lambda: quality_focal_loss(X, torch.tensor([0, 4]), S)),
    "qfl_scores_shape": ("scores", lambda: quality_focal_loss(X, L, torch.zeros(2, 3))),
    "qfl_scores_range": ("scores", lambda: quality_focal_loss(X, L, torch.tensor([1.5, 0.0]))),
    "vfl_targets_range": ("targets", lambda: varifocal_loss(X, torch.full((2, 3), -0.5))),
    "vfl_targets_integer": ("targets", lambda: varifocal_loss(X, torch.zeros(2, 3, dtype=torch.long))),
    "vfl_alpha": ("alpha", lambda: varifocal_loss(X, torch.zeros(2, 3), alpha=-0.1)),
    "vfl_logits": ("logits", lambda: varifocal_loss(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))),
    "qfl_scores_grad": ("scores requires grad", lambda: quality_focal_loss(X, L, S.clone().requires_grad_())),
    "vfl_targets_grad": ("targets requires grad", lambda: varifocal_loss(X, torch.zeros(2, 3, requires_grad=True))),
    "softmax_alpha_grad": ("alpha requires grad", lambda: softmax_focal_loss(
        X, L.clamp(max=2), alpha=torch.ones(3, requires_grad=True))),
    "fl_star_gamma_inf": ("gamma holds inf", lambda: sigmoid_focal_loss_star(X, L, gamma=math.inf)),
    "probs_targets_nan": ("targets holds nan", lambda: focal_loss_with_probs(P, torch.full((2, 3), math.nan))),
    "probs_alpha_string": ("alpha holds '0.25'", lambda: focal_loss_with_probs(P, L, alpha="0.25")),
    "nll_target_uint8": ("target holds 255", lambda: nll_loss_with_probs(P, torch.tensor([0, 255], dtype=torch.uint8))),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_argument(case: str) -> None:
    name, call = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=name):
        call()


def test_qfl_score_outside_unit_interval_is_fine_on_non_positive_rows() -> None:
    quality_focal_loss(X, torch.tensor([3, -1]), torch.tensor([5.0, -2.0]))


# --------------------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------------------
def test_focal_loss_curves_follow_the_paper_formulas() -> None:
    from detfocal.evaluation.plots import focal_loss_curves

    p_t, losses, grads = focal_loss_curves((0.0, 2.0), num_points=200)
    assert p_t[0] > 0 and p_t[-1] == 1
    inner = p_t < 1
    p = p_t[inner]
    torch.testing.assert_close(losses[0.0][inner], -torch.log(p))
    torch.testing.assert_close(losses[2.0][inner], -(1 - p) ** 2 * torch.log(p))
    # |dFL/dx| = (1 - p_t)^gamma |gamma p_t log p_t + p_t - 1| (paper, appendix B); CE: 1 - p_t.
    torch.testing.assert_close(grads[0.0][inner], 1 - p)
    torch.testing.assert_close(grads[2.0][inner], ((1 - p) ** 2 * (2 * p * torch.log(p) + p - 1)).abs())
    assert losses[2.0][-1] < 1e-15 and grads[2.0][-1] < 1e-15  # p_t = 1: no loss, no gradient


@pytest.mark.slow
def test_plot_focal_writes_png_and_svg(tmp_path: Path) -> None:
    out = tmp_path / "figures"
    result = subprocess.run([sys.executable, "tools/plot_focal.py", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.split()
    for name in ("focal_loss", "focal_gradient", "fl_star"):
        png, svg = out / f"{name}.png", out / f"{name}.svg"
        assert str(png) in printed and str(svg) in printed
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
        assert "<svg" in svg.read_text()


def test_plot_focal_reports_a_bad_out_dir_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In process (the subprocess test above already covers the entry point): a user error is
    # one line on stderr and exit code 2, no traceback.
    from detfocal.cli import main

    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    assert main(["plot-focal", "--out", str(not_a_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out_dir must be a directory") and len(err.strip().splitlines()) == 1
