"""detfocal.losses: sigmoid and softmax focal loss against torchvision, F.* and float64 formulas."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

from conftest import LOSS_SCALES, assert_half_grad_matches_float64, backward_ops_on
from detfocal import SigmoidFocalLoss, sigmoid_focal_loss, softmax_focal_loss
from detfocal.losses import (double_backward, focal_loss_with_probs, quality_focal_loss, sigmoid_focal_loss_star,
                             varifocal_loss)

ALPHAS = [-1, 0.0, 0.25, 0.58, 1.0]
GAMMAS = [0.0, 0.5, 1.0, 2.0, 5.0]


def _value_and_grad(fn, logits, *args, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    # A non-uniform upstream gradient also checks "none"'s elementwise backward.
    upstream = (torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
                if out.dim() else 1.0)
    (grad,) = torch.autograd.grad((out * upstream).sum(), x)
    return out.detach(), grad


def _reference_focal64(logits, targets, alpha, gamma):
    """Paper eq. 5 written directly in float64, for 0/1 or soft targets (torchvision's definition)."""
    z = logits.double()
    t = targets.double()
    p = torch.sigmoid(z)
    # log p = -softplus(-z) and log(1 - p) = -softplus(z): log1p(-p) loses digits once p rounds near 1
    # (at z = 36.7, float64's p is 1 - 2**-53 and log1p(-p) is off by 0.68).
    ce = t * torch.nn.functional.softplus(-z) + (1 - t) * torch.nn.functional.softplus(z)
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None and alpha >= 0:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return loss


# ---------------------------------------------------------------- float targets vs torchvision
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_float_targets_match_torchvision_values_and_grads(alpha, gamma, reduction):
    logits = torch.randn(3, 17, 6, dtype=torch.float64) * 3
    targets = (torch.rand(3, 17, 6) < 0.2).double()
    ours, our_grad = _value_and_grad(sigmoid_focal_loss, logits, targets, alpha, gamma, reduction)
    theirs, their_grad = _value_and_grad(tv_sigmoid_focal_loss, logits, targets, alpha, gamma, reduction)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_soft_targets_match_torchvision(gamma):
    logits = torch.randn(40, 5, dtype=torch.float64) * 2
    targets = torch.rand(40, 5, dtype=torch.float64)
    ours, our_grad = _value_and_grad(sigmoid_focal_loss, logits, targets, 0.25, gamma, "sum")
    theirs, their_grad = _value_and_grad(tv_sigmoid_focal_loss, logits, targets, 0.25, gamma, "sum")
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)


def test_fp32_matches_torchvision_fp32(device):
    logits = (torch.randn(2, 300, 80) * 4).to(device)
    targets = (torch.rand(2, 300, 80) < 0.01).float().to(device)
    ours, our_grad = _value_and_grad(sigmoid_focal_loss, logits, targets, 0.25, 2.0, "sum")
    theirs, their_grad = _value_and_grad(tv_sigmoid_focal_loss, logits, targets, 0.25, 2, "sum")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-4, atol=1e-7)


def test_matches_float64_formula(device):
    logits = (torch.randn(50, 7, dtype=torch.float64) * 5).to(device)
    targets = (torch.rand(50, 7) < 0.3).double().to(device)
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, 0.3, 1.5),
                               _reference_focal64(logits, targets, 0.3, 1.5))


# ---------------------------------------------------------------- integer labels
def _one_hot_rows(labels, num_classes):
    one_hot = torch.zeros(*labels.shape, num_classes + 1, dtype=torch.float64, device=labels.device)
    one_hot.scatter_(-1, labels.clamp(min=0).unsqueeze(-1), 1.0)
    return one_hot[..., :num_classes]


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("ignore_index", [-1, 255])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_integer_labels_equal_float_path_on_one_hot(reduction, ignore_index, gamma, device):
    num_classes = 6
    logits = (torch.randn(4, 30, num_classes, dtype=torch.float64) * 3).to(device)
    labels = torch.randint(0, num_classes + 1, (4, 30))  # num_classes = background
    labels[torch.rand(4, 30) < 0.2] = ignore_index
    labels = labels.to(device)
    keep = labels != ignore_index

    ours, our_grad = _value_and_grad(sigmoid_focal_loss, logits, labels, 0.25, gamma, reduction,
                                     ignore_index=ignore_index)
    ref_logits = logits[keep]
    ref_targets = _one_hot_rows(labels[keep], num_classes)
    if reduction == "none":
        ref = torch.zeros_like(logits)
        ref[keep] = tv_sigmoid_focal_loss(ref_logits, ref_targets, 0.25, gamma, "none")
        torch.testing.assert_close(ours, ref)
        x = ref_logits.clone().requires_grad_(True)
        upstream = torch.linspace(0.5, 1.5, logits.numel(), dtype=logits.dtype, device=device).reshape(logits.shape)
        tv_sigmoid_focal_loss(x, ref_targets, 0.25, gamma, "none").mul(upstream[keep]).sum().backward()
        torch.testing.assert_close(our_grad[keep], x.grad)
    else:
        ref = tv_sigmoid_focal_loss(ref_logits, ref_targets, 0.25, gamma, reduction)
        torch.testing.assert_close(ours, ref)
        x = ref_logits.clone().requires_grad_(True)
        tv_sigmoid_focal_loss(x, ref_targets, 0.25, gamma, reduction).backward()
        torch.testing.assert_close(our_grad[keep], x.grad)
    assert torch.all(our_grad[~keep] == 0), "ignored rows must get zero gradient"


def test_background_label_makes_every_class_negative():
    logits = torch.randn(5, 4, dtype=torch.float64)
    background = torch.full((5,), 4)
    expected = tv_sigmoid_focal_loss(logits, torch.zeros_like(logits), 0.25, 2.0)
    torch.testing.assert_close(sigmoid_focal_loss(logits, background), expected)


def test_integer_label_dtypes_agree():
    logits = torch.randn(10, 3)
    labels = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2, 3, 3])
    reference = sigmoid_focal_loss(logits, labels, reduction="sum")
    for dtype in (torch.int32, torch.int16, torch.int8):
        torch.testing.assert_close(sigmoid_focal_loss(logits, labels.to(dtype), reduction="sum"), reference)


def test_per_class_alpha_equals_float_formula():
    num_classes = 3
    alpha = [0.1, 0.5, 0.9]
    logits = torch.randn(20, num_classes, dtype=torch.float64)
    labels = torch.randint(0, num_classes + 1, (20,))
    t = _one_hot_rows(labels, num_classes)
    alpha_t = torch.tensor(alpha, dtype=torch.float64)
    ref = _reference_focal64(logits, t, None, 2.0) * (alpha_t * t + (1 - alpha_t) * (1 - t))
    torch.testing.assert_close(sigmoid_focal_loss(logits, labels, alpha, 2.0), ref)
    torch.testing.assert_close(sigmoid_focal_loss(logits, t, torch.tensor(alpha), 2.0), ref)


def test_per_row_alpha_broadcasts_over_classes():
    logits = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.randint(0, 5, (6,))
    row_alpha = torch.linspace(0.1, 0.9, 6, dtype=torch.float64)
    t = _one_hot_rows(labels, 4)
    a = row_alpha[:, None]
    ref = _reference_focal64(logits, t, None, 2.0) * (a * t + (1 - a) * (1 - t))
    torch.testing.assert_close(sigmoid_focal_loss(logits, labels, row_alpha, 2.0), ref)


# ---------------------------------------------------------------- degenerate cases
def test_gamma0_no_alpha_is_bce():
    logits = torch.randn(8, 9, 5, dtype=torch.float64) * 4
    targets = (torch.rand(8, 9, 5) < 0.5).double()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, -1, 0.0), bce)
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, None, 0.0, "mean"), bce.mean())


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0])
def test_focal_never_exceeds_bce(gamma):
    logits = torch.randn(1000, 3, dtype=torch.float64) * 6
    targets = (torch.rand(1000, 3) < 0.5).double()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert torch.all(sigmoid_focal_loss(logits, targets, -1, gamma) <= bce + 1e-15)


def test_empty_inputs():
    logits = torch.zeros(0, 80, requires_grad=True)
    total = sigmoid_focal_loss(logits, torch.zeros(0, dtype=torch.long), reduction="sum")
    total.backward()
    assert total.item() == 0.0 and logits.grad.shape == (0, 80)
    assert sigmoid_focal_loss(logits, torch.zeros(0, 80), reduction="none").shape == (0, 80)
    assert sigmoid_focal_loss(logits, torch.zeros(0, dtype=torch.long), reduction="mean").item() == 0.0


def test_all_ignored_mean_is_zero_with_zero_grad():
    logits = torch.randn(4, 3, requires_grad=True)
    loss = sigmoid_focal_loss(logits, torch.full((4,), -1), reduction="mean")
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def test_module_wrapper_matches_function():
    logits = torch.randn(7, 4)
    labels = torch.randint(-1, 5, (7,))
    module = SigmoidFocalLoss(alpha=0.4, gamma=1.5, reduction="sum")
    torch.testing.assert_close(module(logits, labels), sigmoid_focal_loss(logits, labels, 0.4, 1.5, "sum"))


# ---------------------------------------------------------------- gradients and numerics
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_gradcheck_float64(gamma, reduction):
    logits = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 4, -1, 2, 3]] * 3)
    soft = torch.rand(3, 5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: sigmoid_focal_loss(x, labels, 0.25, gamma, reduction), (logits,))
    assert torch.autograd.gradcheck(lambda x: sigmoid_focal_loss(x, soft, 0.25, gamma, reduction), (logits,))


def test_gradient_matches_paper_formula():
    """dFL/dx = alpha (1-p)^gamma (gamma p log p + p - 1) for a positive (paper, appendix)."""
    x = torch.linspace(-8, 8, 33, dtype=torch.float64)
    alpha, gamma = 0.25, 2.0
    _, grad = _value_and_grad(lambda z: sigmoid_focal_loss(z, torch.ones_like(z), alpha, gamma, "sum"), x)
    p = torch.sigmoid(x)
    torch.testing.assert_close(grad, alpha * (1 - p) ** gamma * (gamma * p * torch.log(p) + p - 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_finite_at_saturated_logits(dtype, gamma):
    logits = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, 30.0]], dtype=dtype, requires_grad=True)
    for targets in (torch.tensor([0, 1]), torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=dtype)):
        logits.grad = None
        loss = sigmoid_focal_loss(logits, targets, 0.25, gamma, "sum")
        loss.backward()
        assert torch.isfinite(loss) and torch.all(torch.isfinite(logits.grad)), (targets, loss, logits.grad)
        assert logits.grad.dtype == dtype


def test_gradient_at_saturated_logits_is_the_papers_closed_form():
    """At gamma < 1 and |x| = 100, autograd of the formula is NaN; the paper's closed form is not."""
    x = torch.tensor([100.0, -100.0, 3.0, -3.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    sigmoid_focal_loss(x, t, 0.25, 0.5, "sum").backward()
    # Lin et al. 2017, appendix: dFL/dx_t = alpha_t (1 - p_t)^gamma (gamma p_t log p_t + p_t - 1), x_t = (2t - 1) x.
    # Written with q = 1 - p_t = sigmoid(-x_t) and log p_t = -softplus(-x_t), so nothing cancels.
    x_t = (2 * t - 1) * x.detach()
    p_t, q = torch.sigmoid(x_t), torch.sigmoid(-x_t)
    alpha_t = 0.25 * t + 0.75 * (1 - t)
    expected = (2 * t - 1) * alpha_t * q ** 0.5 * (0.5 * p_t * -torch.nn.functional.softplus(-x_t) - q)
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-300)


# ---------------------------------------------------------------- mixed precision vs float64
def _half_precision_cases(reduction, device="cpu"):
    """name -> (loss_fn(x), float32 input): detector-like logits (randn * 3 - 4) and their labels, on ``device``."""
    generator = torch.Generator().manual_seed(11)
    shape = (2, 300, 12)
    logits = torch.randn(*shape, generator=generator) * 3 - 4
    labels = torch.full(shape[:2], shape[-1])
    labels.view(-1)[torch.randperm(600, generator=generator)[:40]] = torch.randint(0, 12, (40,), generator=generator)
    labels[0, :5] = -1
    hard = (torch.rand(shape, generator=generator) < 0.05).float()
    soft = torch.where(torch.rand(shape, generator=generator) < 0.5, hard, torch.rand(shape, generator=generator))
    scores = torch.rand(shape[:2], generator=generator)
    iou = torch.where(hard > 0, torch.rand(shape, generator=generator), 0.0)
    probs = torch.sigmoid(torch.randn(shape, generator=generator) * 1.5)
    logits, labels, hard, soft, scores, iou, probs = (t.to(device) for t in (logits, labels, hard, soft, scores, iou,
                                                                             probs))
    return {
        "sigmoid_labels": (lambda x: sigmoid_focal_loss(x, labels, 0.25, 2.0, reduction), logits),
        "sigmoid_soft": (lambda x: sigmoid_focal_loss(x, soft, 0.25, 2.0, reduction), logits),
        "sigmoid_gamma0.5": (lambda x: sigmoid_focal_loss(x, labels, 0.25, 0.5, reduction), logits),
        "softmax": (lambda x: softmax_focal_loss(x, labels.clamp(0, 11), None, 2.0, reduction), logits + 4),
        "qfl": (lambda x: quality_focal_loss(x, labels, scores, 2.0, reduction), logits),
        "vfl": (lambda x: varifocal_loss(x, iou, reduction=reduction), logits),
        "fl_star": (lambda x: sigmoid_focal_loss_star(x, labels, reduction=reduction), logits),
        "probs": (lambda x: focal_loss_with_probs(x, labels, reduction=reduction, eps=1e-4), probs),
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("name", list(_half_precision_cases("sum")))
def test_half_precision_gradient_is_float64_gradient_rounded_once_at_every_loss_scale(name, reduction, dtype, device):
    loss_fn, inputs = _half_precision_cases(reduction, device)[name]
    for scale in LOSS_SCALES:
        assert_half_grad_matches_float64(loss_fn, inputs.to(dtype), scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_gradient_of_a_detector_batch_has_no_nan_and_no_flushed_zeros(dtype, device):
    """[1, 4000, 80] fp16 logits, 50 positives: a gradient saved in fp16 gave all NaN at GradScaler's
    65536 and, for "mean" at 2^10, ~96k zeros where the rounded float64 gradient is not."""
    logits = (torch.randn(1, 4000, 80) * 3 - 4).to(device, dtype)
    labels = torch.full((1, 4000), 80)
    labels[0, torch.randperm(4000)[:50]] = torch.randint(0, 80, (50,))
    labels = labels.to(device)
    for reduction, scale in (("sum", 2.0 ** 16), ("mean", 2.0 ** 10)):
        assert_half_grad_matches_float64(lambda x: sigmoid_focal_loss(x, labels, reduction=reduction), logits, scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(dtype):
    logits = torch.randn(64, 10) * 5
    labels = torch.randint(0, 11, (64,))
    low = sigmoid_focal_loss(logits.to(dtype), labels, reduction="none")
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, sigmoid_focal_loss(logits.to(dtype).float(), labels, reduction="none"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_only_one_logits_sized_tensor_kept_for_backward_in_fp32(dtype):
    import gc

    logits = torch.randn(2, 50, 8).to(dtype).requires_grad_()
    labels = torch.randint(0, 9, (2, 50))

    def logits_sized():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # touching deprecated torch aliases while scanning gc
            return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.shape == logits.shape]

    before = {id(o) for o in logits_sized()}
    loss = sigmoid_focal_loss(logits, labels, reduction="sum")
    kept = [o for o in logits_sized() if id(o) not in before]
    assert [o.dtype for o in kept] == [torch.float32]  # fp16 logits: the gradient waits in fp32
    loss.backward()
    assert logits.grad.dtype == dtype


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    num_classes=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    gamma=st.sampled_from(GAMMAS),
    alpha=st.sampled_from(ALPHAS),
    scale=st.sampled_from([1.0, 10.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_property_integer_path_equals_float64_formula(shape, num_classes, dtype, gamma, alpha, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, num_classes, generator=generator) * scale).to(dtype)
    labels = torch.randint(-1, num_classes + 1, tuple(shape), generator=generator)
    x = logits.clone().requires_grad_(True)
    loss = sigmoid_focal_loss(x, labels, alpha, gamma, "sum")
    loss.backward()
    keep = labels != -1
    # The reference: the formula in float64 on the same (rounded) logits, differentiated by autograd.
    x64 = logits.double().requires_grad_(True)
    ref = _reference_focal64(x64[keep], _one_hot_rows(labels[keep], num_classes), alpha, gamma)
    ref.sum().backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(x.grad))
    assert torch.all(x.grad[~keep] == 0)  # ignored rows take no gradient
    if bool(torch.isfinite(ref).all()):  # the naive float64 formula itself overflows at |x| = 1e4
        torch.testing.assert_close(loss.double(), ref.sum(), rtol=1e-4, atol=1e-4)
    grad64 = x64.grad[keep]
    finite = torch.isfinite(grad64)  # autograd of the formula is NaN at saturation for gamma < 1
    # The gradient is rounded once to the logits' dtype (a few ulp; fp16's subnormal spacing); the
    # naive float64 formula loses digits of its own on tiny gradients, hence an absolute floor.
    rtol, atol = {torch.float16: (2e-3, 6e-8), torch.bfloat16: (1.6e-2, 1e-30), torch.float32: (1e-5, 1e-12),
                  torch.float64: (1e-8, 1e-14)}[dtype]
    torch.testing.assert_close(x.grad[keep].double()[finite], grad64[finite], rtol=rtol, atol=atol)


# ---------------------------------------------------------------- softmax focal loss
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_softmax_gamma0_is_cross_entropy(reduction):
    logits = torch.randn(30, 5, dtype=torch.float64) * 3
    target = torch.randint(0, 5, (30,))
    target[::7] = -100
    weight = torch.tensor([0.2, 1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    for alpha in (None, weight):
        ours, our_grad = _value_and_grad(softmax_focal_loss, logits, target, alpha, 0.0, reduction)
        theirs, their_grad = _value_and_grad(F.cross_entropy, logits, target, alpha, reduction=reduction)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(our_grad, their_grad)


def test_softmax_gamma0_matches_cross_entropy_with_custom_ignore_index_nd():
    logits = torch.randn(2, 6, 4, 3, dtype=torch.float64)  # [B, H, W, C]
    target = torch.randint(0, 3, (2, 6, 4))
    target[0, 0] = 7
    ours = softmax_focal_loss(logits, target, gamma=0.0, ignore_index=7)
    theirs = F.cross_entropy(logits.permute(0, 3, 1, 2), target, ignore_index=7)
    torch.testing.assert_close(ours, theirs)


def test_softmax_gamma2_matches_float64_formula():
    logits = torch.randn(25, 6, dtype=torch.float64) * 2
    target = torch.randint(0, 6, (25,))
    alpha = torch.rand(6, dtype=torch.float64)
    p_t = torch.softmax(logits, -1).gather(-1, target[:, None]).squeeze(-1)
    per_sample = -alpha[target] * (1 - p_t) ** 2 * torch.log(p_t)
    torch.testing.assert_close(softmax_focal_loss(logits, target, alpha, 2.0, "none"), per_sample)
    torch.testing.assert_close(softmax_focal_loss(logits, target, alpha, 2.0, "mean"),
                               per_sample.sum() / alpha[target].sum())


def test_softmax_focal_weights_each_sample_not_the_batch_mean():
    """(1 - exp(-CE_mean))^gamma * CE_mean, the factor applied to the batch mean, is not a focal loss."""
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    target = torch.tensor([0, 0])  # one easy, one hard sample
    ce_mean = F.cross_entropy(logits, target)
    batch_mean_value = (1 - torch.exp(-ce_mean)) ** 2 * ce_mean
    assert not torch.isclose(softmax_focal_loss(logits, target, gamma=2.0), batch_mean_value)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_softmax_gradcheck_and_saturation(gamma):
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, -100, 1])
    assert torch.autograd.gradcheck(lambda x: softmax_focal_loss(x, target, None, gamma, "mean"), (logits,))
    assert torch.autograd.gradcheck(lambda x: softmax_focal_loss(x, target, None, gamma, "none"), (logits,))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], dtype=dtype, requires_grad=True)
        softmax_focal_loss(x, torch.tensor([0, 0]), gamma=gamma).backward()
        assert torch.all(torch.isfinite(x.grad))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda x: sigmoid_focal_loss(x, torch.zeros(4, 2)), "targets"),
        (lambda x: sigmoid_focal_loss(x, torch.zeros(5, dtype=torch.long)), "targets"),
        (lambda x: sigmoid_focal_loss(x, torch.tensor([0, 1, 4, 2])), "targets"),
        (lambda x: sigmoid_focal_loss(x, torch.tensor([0, 1, -2, 2])), "targets"),
        (lambda x: sigmoid_focal_loss(x, torch.zeros(4, 3), gamma=-0.5), "gamma"),
        (lambda x: sigmoid_focal_loss(x, torch.zeros(4, 3), alpha=1.5), "alpha"),
        (lambda x: sigmoid_focal_loss(x, torch.zeros(4, 3), alpha=[0.1, 0.2]), "alpha"),
        (lambda x: sigmoid_focal_loss(x, torch.zeros(4, 3), reduction="avg"), "reduction"),
        (lambda x: sigmoid_focal_loss(x.long(), torch.zeros(4, 3)), "logits"),
        (lambda x: sigmoid_focal_loss(x, torch.zeros(4, 3), label_smoothing=2.0), "label_smoothing"),
        (lambda x: softmax_focal_loss(x, torch.tensor([0, 1, 3, 2])), "target"),
        (lambda x: softmax_focal_loss(x, torch.zeros(4, 3)), "target"),
        (lambda x: softmax_focal_loss(x, torch.zeros(4, dtype=torch.long), alpha=[1.0]), "alpha"),
        (lambda x: softmax_focal_loss(x, torch.zeros(4, dtype=torch.long), gamma=-1), "gamma"),
        (lambda x: softmax_focal_loss(x, torch.zeros(4, dtype=torch.long), reduction="avg"), "reduction"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        call(torch.randn(4, 3))


NON_FINITE_GAMMA_CALLS = {
    "sigmoid": lambda g: sigmoid_focal_loss(torch.randn(4, 3), torch.zeros(4, 3), gamma=g),
    "softmax": lambda g: softmax_focal_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), gamma=g),
    "module": lambda g: SigmoidFocalLoss(gamma=g),
    "probs": lambda g: focal_loss_with_probs(torch.rand(4, 3), torch.zeros(4, 3), gamma=g),
    "fl_star": lambda g: sigmoid_focal_loss_star(torch.randn(4, 3), torch.zeros(4, 3), gamma=g),
    "vfl": lambda g: varifocal_loss(torch.randn(4, 3), torch.zeros(4, 3), gamma=g),
}


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("name", list(NON_FINITE_GAMMA_CALLS))
def test_non_finite_gamma_raises_value_error(name, value):
    with pytest.raises(ValueError, match=rf"^gamma holds {value}, expected a finite real (>= 0|> 0)$"):
        NON_FINITE_GAMMA_CALLS[name](value)
    with pytest.raises(ValueError, match=rf"^beta holds {value}, expected a finite real >= 0$"):
        quality_focal_loss(torch.randn(2, 3), torch.tensor([0, 3]), torch.rand(2), beta=value)


@pytest.mark.parametrize("bad", [-0.5, 1.5, math.nan], ids=["negative", "above_one", "nan"])
def test_float_targets_outside_unit_interval_raise_value_error_with_an_example(bad):
    targets = torch.rand(4, 3)
    targets[2, 1] = bad
    with pytest.raises(ValueError, match=rf"^targets holds {bad}, expected values in \[0, 1\]$"):
        sigmoid_focal_loss(torch.randn(4, 3), targets)


def test_unsigned_labels_are_compared_as_their_values():
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 3, 255, 1], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"^targets holds 255, expected labels in \[0, 3\]"):
        sigmoid_focal_loss(logits, labels)  # 255 is not -1: it is out of range, not ignored
    got = sigmoid_focal_loss(logits, labels, ignore_index=255, reduction="sum")
    torch.testing.assert_close(got, sigmoid_focal_loss(logits, labels.long(), ignore_index=255, reduction="sum"))
    torch.testing.assert_close(got, sigmoid_focal_loss(logits, torch.tensor([0, 3, -1, 1]), reduction="sum"))


def test_string_alpha_and_empty_class_dimension_raise_value_error():
    with pytest.raises(ValueError, match=r"^alpha holds '0.25' \(str\), expected a real in \[0, 1\], -1/None, or "
                                         r"per-class/per-row weights$"):
        sigmoid_focal_loss(torch.randn(4, 3), torch.zeros(4, 3), alpha="0.25")
    with pytest.raises(ValueError, match=r"^alpha holds"):
        softmax_focal_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), alpha="0.25")
    for call in (lambda: sigmoid_focal_loss(torch.randn(4, 0), torch.zeros(4, dtype=torch.long)),
                 lambda: sigmoid_focal_loss(torch.randn(4, 0), torch.zeros(4, 0)),
                 lambda: softmax_focal_loss(torch.randn(4, 0), torch.zeros(4, dtype=torch.long))):
        with pytest.raises(ValueError, match=r"^logits holds 0 classes"):
            call()


def test_error_names_the_offending_value():
    with pytest.raises(ValueError, match="holds 7, expected labels in"):
        sigmoid_focal_loss(torch.randn(3, 4), torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match="-0.5"):
        sigmoid_focal_loss(torch.randn(3, 4), torch.tensor([0, 1, 1]), gamma=-0.5)
    assert math.isfinite(sigmoid_focal_loss(torch.randn(3, 4), torch.tensor([0, 4, -1]), reduction="sum").item())


# ---------------------------------------------------------------- gradients into targets and alpha
def _reference_with_tensor_alpha(logits, targets, alpha, gamma):
    """torchvision's definition with alpha a tensor broadcast against the logits, float64."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    return ce * (1 - p_t) ** gamma * (alpha * targets + (1 - alpha) * (1 - targets))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_soft_target_gradient_matches_torchvision_autograd(gamma, reduction):
    logits = torch.randn(6, 20, 5, dtype=torch.float64) * 3
    targets = torch.where(torch.rand(6, 20, 5) < 0.3, (torch.rand(6, 20, 5) < 0.5).double(),
                          torch.rand(6, 20, 5, dtype=torch.float64))
    grads = []
    for fn in (sigmoid_focal_loss, tv_sigmoid_focal_loss):
        x, t = logits.clone().requires_grad_(), targets.clone().requires_grad_()
        out = fn(x, t, 0.25, gamma, reduction)
        upstream = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
        grads.append(torch.autograd.grad((out * upstream).sum(), (x, t)))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_gradcheck_through_logits_targets_and_alpha(gamma):
    logits = (torch.randn(3, 4, 3, dtype=torch.float64) * 2).requires_grad_()
    targets = (torch.rand(3, 4, 3, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    per_class = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64, requires_grad=True)
    per_row = (torch.rand(3, 4, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    labels = torch.tensor([[0, 3, -1, 2]] * 3)
    for reduction in ("none", "mean"):
        assert torch.autograd.gradcheck(lambda x, t, a: sigmoid_focal_loss(x, t, a, gamma, reduction),
                                        (logits, targets, per_class))
        assert torch.autograd.gradcheck(lambda x, a: sigmoid_focal_loss(x, labels, a, gamma, reduction,
                                                                         label_smoothing=0.1), (logits, per_row))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_alpha_tensor_gradient_matches_float64_autograd(reduction):
    logits = torch.randn(5, 8, 4, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (5, 8))
    labels[0, :2] = -1
    keep = (labels != -1).unsqueeze(-1).double()
    one_hot = _one_hot_rows(labels, 4)
    for alpha in (torch.rand(4, dtype=torch.float64), torch.rand(5, 8, dtype=torch.float64)):  # per class, per row
        for targets in (labels, one_hot):
            a = alpha.clone().requires_grad_()
            out = sigmoid_focal_loss(logits, targets, a, 1.5, reduction)
            ref_a = alpha.clone().requires_grad_()
            ref = _reference_with_tensor_alpha(logits, one_hot, ref_a if alpha.dim() == 1 else ref_a[..., None], 1.5)
            if targets is labels:
                ref = ref * keep
            count = keep.sum() * 4 if targets is labels else ref.numel()
            ref = ref if reduction == "none" else ref.sum() / (count if reduction == "mean" else 1)
            upstream = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
            (got,) = torch.autograd.grad((out * upstream).sum(), a)
            (expected,) = torch.autograd.grad((ref * upstream).sum(), ref_a)
            torch.testing.assert_close(out, ref)
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("targets", ["labels", "float"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("normalizer", [7.0, torch.tensor(0.37), torch.tensor([1e-3], dtype=torch.float64)])
def test_normalizer_divides_the_reduced_loss_and_its_gradient_as_float64(targets, reduction, normalizer, device):
    torch.manual_seed(0)
    logits = (torch.randn(3, 40, 5) * 3).to(device)
    labels = torch.randint(-1, 6, (3, 40)).to(device)
    one_hot = F.one_hot(labels.clamp(min=0), 6)[..., :5].float()
    target = labels if targets == "labels" else one_hot
    keep = (labels != -1).unsqueeze(-1).double() if targets == "labels" else torch.ones_like(one_hot, dtype=torch.float64)
    reference = _reference_focal64(logits, one_hot, 0.25, 2.0) * keep
    count = keep.expand(3, 40, 5).sum() if reduction == "mean" else 1.0
    divide_by = float(normalizer) * count
    z64 = logits.double().requires_grad_(True)
    (_reference_focal64(z64, one_hot, 0.25, 2.0) * keep).sum().div(divide_by).backward()
    got, grad = _value_and_grad(sigmoid_focal_loss, logits, target, reduction=reduction, normalizer=normalizer)
    torch.testing.assert_close(got.double(), reference.sum() / divide_by, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), z64.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("bad, reduction, match", [
    (0.0, "sum", "normalizer holds 0.0, expected a finite real > 0"),
    (-2, "sum", "normalizer holds -2.0"),
    (float("nan"), "mean", "normalizer holds nan"),
    (torch.tensor([1.0, 2.0]), "sum", "one-element real tensor, got a torch.float32 tensor of shape \\(2,\\)"),
    ("3", "sum", "normalizer holds '3'"),
    (2.0, "none", "got reduction='none'"),
    (1e-46, "sum", "normalizer \\(as torch.float32\\) holds 0.0"),
    (1e39, "sum", "normalizer \\(as torch.float32\\) holds inf"),
    (torch.tensor(2.0, requires_grad=True), "sum", "normalizer requires grad"),
])
def test_bad_normalizer_raises_value_error_naming_it(bad, reduction, match):
    with pytest.raises(ValueError, match=match):
        sigmoid_focal_loss(torch.randn(2, 3), torch.tensor([0, 3]), reduction=reduction, normalizer=bad)


@pytest.mark.parametrize("normalizer", [None, 12.0], ids=["sum", "normalised"])
def test_plain_backward_hands_the_saved_gradient_to_the_leaf_without_a_pass(normalizer):
    logits = (torch.randn(2, 300, 8) * 2).requires_grad_()
    labels = torch.randint(-1, 9, (2, 300))
    ops = backward_ops_on(logits.shape, lambda: sigmoid_focal_loss(logits, labels, reduction="sum",
                                                                    normalizer=normalizer))
    assert ops == []  # no multiply and no copy into .grad: the buffer the forward wrote is the gradient
    x64 = logits.detach().double().requires_grad_()
    one_hot = F.one_hot(labels.clamp(min=0), 9)[..., :8].double()
    (_reference_focal64(x64, one_hot, 0.25, 2.0) * (labels != -1).unsqueeze(-1)).sum().div(normalizer or 1).backward()
    torch.testing.assert_close(logits.grad.double(), x64.grad, rtol=1e-4, atol=1e-8)
    # A loss weight or a GradScaler's scale is one in-place multiply, still no copy.
    logits.grad = None
    assert backward_ops_on(logits.shape, lambda: 3 * sigmoid_focal_loss(logits, labels, reduction="sum")) == ["aten::mul_"]


def test_a_second_backward_without_retain_graph_raises_as_torch_does():
    logits = torch.randn(4, 3, requires_grad=True)
    loss = sigmoid_focal_loss(logits, torch.tensor([0, 1, 3, -1]), reduction="sum")
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_backward_twice_through_retained_graph_is_correct():
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    loss = sigmoid_focal_loss(logits, torch.tensor([0, 1, 3, -1]), reduction="sum")
    (first,) = torch.autograd.grad(loss * 3.0, logits, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 0.5, logits)
    torch.testing.assert_close(second, first / 6.0)


def test_gradient_handed_out_with_retain_graph_is_a_copy_the_caller_may_modify():
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 3, -1])
    x64 = logits.detach().clone().requires_grad_()
    one_hot = F.one_hot(labels.clamp(min=0), 4)[:, :3].double() * (labels != -1).unsqueeze(-1)
    (reference,) = torch.autograd.grad(_reference_focal64(x64, one_hot, 0.25, 2.0)[labels != -1].sum(), x64)
    for loss in (sigmoid_focal_loss(logits, labels, reduction="sum"),
                 sigmoid_focal_loss(logits, one_hot + 0.0 * (labels == -1).unsqueeze(-1), reduction="none")):
        upstream = torch.ones_like(loss) * (labels != -1).unsqueeze(-1) if loss.dim() else torch.ones(())
        for scale in (1.0, 3.0):
            (first,) = torch.autograd.grad(loss, logits, upstream * scale, retain_graph=True)
            torch.testing.assert_close(first, reference * scale, rtol=1e-10, atol=1e-14)
            first.mul_(100.0)  # the caller's tensor: must not be the buffer the next backward reads
        (last,) = torch.autograd.grad(loss, logits, upstream)
        torch.testing.assert_close(last, reference, rtol=1e-10, atol=1e-14)


def test_backward_with_retain_graph_twice_accumulates_torchvisions_gradient_twice():
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.rand(5, 4, dtype=torch.float64)
    loss = sigmoid_focal_loss(logits, targets, reduction="mean")
    loss.backward(retain_graph=True)
    loss.backward()
    x64 = logits.detach().clone().requires_grad_()
    tv_sigmoid_focal_loss(x64, targets, reduction="mean").backward()
    torch.testing.assert_close(logits.grad, 2 * x64.grad, rtol=1e-10, atol=1e-14)


def test_softmax_gradient_handed_out_with_retain_graph_is_a_copy():
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 1, 0])
    loss = softmax_focal_loss(logits, target, gamma=0.0, reduction="none")  # per row: F.cross_entropy
    upstream = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    (first,) = torch.autograd.grad(loss, logits, upstream, retain_graph=True)
    first.zero_()
    (last,) = torch.autograd.grad(loss, logits, upstream)
    x64 = logits.detach().clone().requires_grad_()
    (F.cross_entropy(x64, target, reduction="none") * upstream).sum().backward()
    torch.testing.assert_close(last, x64.grad, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- second derivatives (create_graph)
def _gradient_penalty(fn, logits, *args, **kwargs):
    """loss + ||dloss/dx||^2, differentiated again: the Hessian enters the gradient."""
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
    total = loss.sum() + grad.pow(2).sum()
    (second,) = torch.autograd.grad(total, x)
    return grad.detach(), total.detach(), second


@pytest.mark.parametrize("alpha", [-1, 0.25])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_create_graph_second_derivative_matches_torchvision(alpha, gamma, reduction):
    logits = torch.randn(3, 7, 4, dtype=torch.float64) * 2
    targets = (torch.rand(3, 7, 4) < 0.3).double()
    ours = _gradient_penalty(sigmoid_focal_loss, logits, targets, alpha, gamma, reduction)
    theirs = _gradient_penalty(tv_sigmoid_focal_loss, logits, targets, alpha, gamma, reduction)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_create_graph_through_integer_labels_matches_float64_autograd(label_smoothing, reduction):
    logits = torch.randn(2, 9, 5, dtype=torch.float64) * 2
    labels = torch.randint(-1, 6, (2, 9))
    alpha = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    kept = (labels != -1).unsqueeze(-1)

    def reference(x):
        t = F.one_hot(labels.clamp(min=0), 6)[..., :5].double()
        t = t * (1 - label_smoothing) + label_smoothing / 2
        loss = _reference_with_tensor_alpha(x, t, alpha, 1.5) * kept
        if reduction == "none":
            return loss
        return loss.sum() / (kept.sum() * 5 if reduction == "mean" else 1)

    ours = _gradient_penalty(sigmoid_focal_loss, logits, labels, alpha, 1.5, reduction,
                             label_smoothing=label_smoothing)
    theirs = _gradient_penalty(reference, logits)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_gradgradcheck_through_logits_soft_targets_and_alpha():
    logits = (torch.randn(3, 4, dtype=torch.float64) * 2).requires_grad_()
    targets = (torch.rand(3, 4, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    alpha = (torch.rand(4, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, t, a: sigmoid_focal_loss(x, t, a, 2.0, "sum"),
                                        (logits, targets, alpha))
    labels = torch.tensor([0, 4, -1])
    assert torch.autograd.gradgradcheck(lambda x: sigmoid_focal_loss(x, labels, 0.25, 0.5, "none"), (logits,))


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_softmax_create_graph_matches_float64_autograd(gamma):
    logits = torch.randn(8, 5, dtype=torch.float64) * 2
    target = torch.tensor([0, 1, 2, 3, 4, -100, 1, 0])
    kept = target != -100

    def reference(x):
        log_p = torch.log_softmax(x, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (-(1 - log_p.exp()) ** gamma * log_p * kept).sum() / kept.sum()

    ours = _gradient_penalty(softmax_focal_loss, logits, target, None, gamma)
    theirs = _gradient_penalty(reference, logits)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_create_graph_on_half_logits_matches_float64_on_the_same_logits():
    labels = torch.tensor([0, 6, 3, -1])
    x16 = (torch.randn(4, 6) * 2).half().requires_grad_()
    (grad,) = torch.autograd.grad(sigmoid_focal_loss(x16, labels, reduction="sum"), x16, create_graph=True)
    assert grad.dtype == torch.float16 and grad.requires_grad
    (second,) = torch.autograd.grad(grad.float().pow(2).sum(), x16)
    x64 = x16.detach().double().requires_grad_()
    (grad64,) = torch.autograd.grad(sigmoid_focal_loss(x64, labels, reduction="sum"), x64, create_graph=True)
    (second64,) = torch.autograd.grad(grad64.pow(2).sum(), x64)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-3, atol=1e-6)  # rounded once to fp16
    torch.testing.assert_close(second.double(), second64, rtol=4e-3, atol=1e-4)  # two fp16 roundings


def test_create_graph_through_intermediate_logits_raises_unless_inside_double_backward():
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 3, -1])
    loss = sigmoid_focal_loss(weight * 2.0, labels, reduction="sum")  # the logits are freed at once
    with pytest.raises(RuntimeError, match="logits was freed after the forward pass.*double_backward"):
        torch.autograd.grad(loss, weight, create_graph=True)
    with double_backward():
        loss = sigmoid_focal_loss(weight * 2.0, labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, weight, create_graph=True)
    (second,) = torch.autograd.grad(grad.pow(2).sum(), weight)
    x = weight.detach().clone().requires_grad_()
    one_hot = F.one_hot(labels.clamp(min=0), 4)[:, :3].double()
    reference_loss = (tv_sigmoid_focal_loss(x * 2.0, one_hot) * (labels != -1).unsqueeze(-1)).sum()
    (reference_grad,) = torch.autograd.grad(reference_loss, x, create_graph=True)
    (reference,) = torch.autograd.grad(reference_grad.pow(2).sum(), x)
    torch.testing.assert_close(second, reference, rtol=1e-9, atol=1e-12)


def test_create_graph_needs_the_logits_unmodified():
    weight = torch.randn(4, 3, requires_grad=True)
    logits = weight.detach().clone().requires_grad_()
    moved = logits * 1.0
    loss = sigmoid_focal_loss(moved, torch.tensor([0, 1, 3, -1]), reduction="sum")
    with torch.no_grad():
        moved.add_(1.0)
    with pytest.raises(RuntimeError, match="logits of the loss was modified in place"):
        torch.autograd.grad(loss, logits, create_graph=True)


def test_create_graph_recomputes_eagerly_even_when_the_loss_is_compiled(fresh_backend, monkeypatch):
    calls = []

    def fake_compile(fn, **kwargs):  # stands in for torch.compile: counts the calls of the "compiled" twin
        def run(*args):
            calls.append(fn.__name__)
            return fn(*args)
        return run

    monkeypatch.setenv("DETFOCAL_COMPILE", "1")
    monkeypatch.setattr(torch, "compile", fake_compile)
    logits = torch.randn(5, 4, dtype=torch.float64)
    labels = torch.tensor([0, 4, 2, -1, 3])
    got = _gradient_penalty(sigmoid_focal_loss, logits, labels, 0.25, 2.0, "sum")
    assert calls == ["focal_int_targets"]  # the forward only: the recomputation under autograd ran eager
    monkeypatch.setenv("DETFOCAL_COMPILE", "0")
    for a, b in zip(got, _gradient_penalty(sigmoid_focal_loss, logits, labels, 0.25, 2.0, "sum")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- non-finite logits
NON_FINITE = (math.inf, -math.inf, math.nan)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_non_finite_logits_on_ignored_rows_give_zero_loss_and_exactly_zero_gradient(reduction, label_smoothing):
    logits = torch.randn(5, 3, dtype=torch.float64) * 2
    labels = torch.tensor([0, -1, 3, -1, 2])
    logits[1] = torch.tensor(NON_FINITE, dtype=torch.float64)
    logits[3, 1] = math.nan
    kept = labels != -1
    out, grad = _value_and_grad(sigmoid_focal_loss, logits, labels, reduction=reduction,
                                label_smoothing=label_smoothing)
    # The reference sees the kept rows only: torchvision on one-hot (smoothed) targets.
    targets = F.one_hot(labels[kept], 4)[:, :3].double() * (1 - label_smoothing) + label_smoothing / 2
    ref_out, ref_grad = _value_and_grad(tv_sigmoid_focal_loss, logits[kept], targets, reduction=reduction)
    if reduction == "none":
        assert torch.equal(out[~kept], torch.zeros(2, 3, dtype=torch.float64))
        out = out[kept]
        # _value_and_grad's upstream is laid over all five rows: rebuild it for the kept ones.
        upstream = torch.linspace(0.5, 1.5, 15, dtype=torch.float64).reshape(5, 3)[kept]
        x = logits[kept].clone().requires_grad_()
        (ref_grad,) = torch.autograd.grad((tv_sigmoid_focal_loss(x, targets) * upstream).sum(), x)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-14)
    assert torch.equal(grad[~kept], torch.zeros(2, 3, dtype=torch.float64))
    torch.testing.assert_close(grad[kept], ref_grad, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_softmax_non_finite_logits_on_ignored_rows_give_zero_loss_and_exactly_zero_gradient(gamma):
    logits = torch.randn(5, 4, dtype=torch.float64)
    target = torch.tensor([0, -100, 3, -100, 2])
    logits[1] = torch.tensor([math.inf, -math.inf, math.nan, 0.0], dtype=torch.float64)
    logits[3, 0] = math.inf
    kept = target != -100
    x = logits.clone().requires_grad_()
    loss = softmax_focal_loss(x, target, gamma=gamma, label_smoothing=0.1)
    loss.backward()
    x64 = logits[kept].clone().requires_grad_()
    log_p = torch.log_softmax(x64, -1)
    log_pt = log_p.gather(-1, target[kept].unsqueeze(-1)).squeeze(-1)
    ce = -(0.9 * log_pt + 0.1 / 4 * log_p.sum(-1))
    reference = ((1 - log_pt.exp()) ** gamma * ce).mean()
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-14)
    assert torch.equal(x.grad[~kept], torch.zeros(2, 4, dtype=torch.float64))
    torch.testing.assert_close(x.grad[kept], x64.grad, rtol=1e-9, atol=1e-14)


def _limit_focal64(sign: float, t: torch.Tensor, alpha: float, gamma: float):
    """Value and d/dz of torchvision's definition as z -> sign * inf, float64.

    p -> 1 (or 0), so 1 - p_t -> 1 - t (or t) and d/dz -> alpha_t (1 - p_t)^gamma (p - t); the
    gamma * p_t log p_t term vanishes. CE -> +inf unless the target puts no weight on the
    saturated side (t = 1 at +inf, t = 0 at -inf), where CE -> 0.
    """
    t = t.double()
    p = 1.0 if sign > 0 else 0.0
    q = (1 - t) if sign > 0 else t
    alpha_t = torch.ones_like(t) if alpha < 0 else alpha * t + (1 - alpha) * (1 - t)
    weight = alpha_t * q ** gamma
    value = torch.where(q > 0, weight * math.inf, torch.zeros_like(t))
    value = torch.where(weight == 0, torch.zeros_like(t), value)
    return value, weight * (p - t)


@pytest.mark.parametrize("alpha", [-1, 0.25, 1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_infinite_logits_give_the_limits_of_value_and_gradient_on_float_targets(alpha, gamma, dtype):
    t = torch.tensor([0.0, 1.0, 0.3, 0.5, 0.0, 1.0, 0.3, 0.5])
    logits = torch.tensor([math.inf] * 4 + [-math.inf] * 4, dtype=dtype, requires_grad=True)
    loss = sigmoid_focal_loss(logits, t.to(dtype), alpha, gamma, "none")
    loss.backward(torch.ones_like(loss))
    expected_value = torch.cat([_limit_focal64(1, t[:4], alpha, gamma)[0], _limit_focal64(-1, t[4:], alpha, gamma)[0]])
    expected_grad = torch.cat([_limit_focal64(1, t[:4], alpha, gamma)[1], _limit_focal64(-1, t[4:], alpha, gamma)[1]])
    torch.testing.assert_close(loss.double(), expected_value, rtol=1e-6, atol=0)
    torch.testing.assert_close(logits.grad.double(), expected_grad, rtol=1e-3 if dtype == torch.float16 else 1e-6,
                               atol=0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_infinite_logits_give_the_limits_of_value_and_gradient_on_integer_labels(gamma, label_smoothing):
    logits = torch.tensor([[math.inf, -math.inf, math.inf], [-math.inf, math.inf, -math.inf]],
                          dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0])
    loss = sigmoid_focal_loss(logits, labels, 0.25, gamma, "none", label_smoothing=label_smoothing)
    loss.backward(torch.ones_like(loss))
    t = F.one_hot(labels, 3).double() * (1 - label_smoothing) + label_smoothing / 2
    sign = torch.sign(logits.detach())
    value_pos, grad_pos = _limit_focal64(1, t, 0.25, gamma)
    value_neg, grad_neg = _limit_focal64(-1, t, 0.25, gamma)
    torch.testing.assert_close(loss.detach(), torch.where(sign > 0, value_pos, value_neg), rtol=1e-12, atol=0)
    torch.testing.assert_close(logits.grad, torch.where(sign > 0, grad_pos, grad_neg), rtol=1e-12, atol=0)
    total = sigmoid_focal_loss(logits.detach()[:1, :1], labels[:1], 0.25, gamma, "sum")
    assert total.item() == 0.0  # a positive at +inf: 0, not inf - inf


def test_nan_logit_on_a_kept_row_stays_nan():
    for targets in (torch.tensor([0, 2]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])):
        logits = torch.tensor([[math.nan, 0.5], [0.1, -0.2]], requires_grad=True)
        loss = sigmoid_focal_loss(logits, targets, reduction="none")
        loss.sum().backward()
        assert loss[0, 0].isnan() and logits.grad[0, 0].isnan()  # a real NaN is reported, not zeroed
        assert torch.isfinite(loss[1]).all() and torch.isfinite(logits.grad[1]).all()


def test_alpha_that_would_enlarge_the_logits_shape_raises_value_error():
    with pytest.raises(ValueError, match=r"^alpha .*logits' shape \(3, 4\).*alpha of shape \(2, 3, 4\)$"):
        sigmoid_focal_loss(torch.randn(3, 4), torch.zeros(3, 4), alpha=torch.full((2, 3, 4), 0.25))
    with pytest.raises(ValueError, match=r"^alpha .*alpha of shape \(3, 2\)$"):
        sigmoid_focal_loss(torch.randn(3, 4), torch.tensor([0, 1, 4]), alpha=torch.full((3, 2), 0.25))
    # Shapes that broadcast into the logits' shape stay accepted: per class, per row, [rows, 1], scalar.
    for alpha in (torch.full((4,), 0.25), torch.full((3,), 0.25), torch.full((3, 1), 0.25), torch.tensor(0.25)):
        assert sigmoid_focal_loss(torch.randn(3, 4), torch.zeros(3, 4), alpha=alpha).shape == (3, 4)


# ---------------------------------------------------------------- compiled path (DETFOCAL_COMPILE)
@pytest.fixture
def fresh_backend(monkeypatch):
    from detfocal.losses import compile as _fused

    monkeypatch.setattr(_fused, "_compiled", {})
    monkeypatch.setattr(_fused, "_state", {"failed": None, "compile_seconds": {}, "last": "eager"})
    return _fused


def test_auto_mode_does_not_compile_small_inputs(fresh_backend, monkeypatch):
    from detfocal.losses import backend

    monkeypatch.setenv("DETFOCAL_COMPILE", "auto")
    sigmoid_focal_loss(torch.randn(4, 100, 8), torch.randint(0, 9, (4, 100)), reduction="sum")
    assert backend()["last"] == "eager" and backend()["compile_seconds"] == {}


def test_bad_compile_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DETFOCAL_COMPILE", "maybe")
    with pytest.raises(ValueError, match="DETFOCAL_COMPILE"):
        sigmoid_focal_loss(torch.randn(4, 3), torch.zeros(4, 3))


def test_compile_failure_falls_back_to_eager_once_with_warning(fresh_backend, monkeypatch):
    from detfocal.losses import backend

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setenv("DETFOCAL_COMPILE", "1")
    monkeypatch.setattr(torch, "compile", broken_compile)
    logits = torch.randn(6, 5)
    labels = torch.randint(0, 6, (6,))
    with pytest.warns(RuntimeWarning, match="falling back to the eager"):
        out = sigmoid_focal_loss(logits, labels, reduction="sum")
    monkeypatch.setenv("DETFOCAL_COMPILE", "0")
    torch.testing.assert_close(out, sigmoid_focal_loss(logits, labels, reduction="sum"))
    assert "no C++ compiler" in backend()["fallback"]


@pytest.mark.slow
def test_compiled_matches_eager_and_does_not_recompile_per_n(fresh_backend, monkeypatch, device):
    import torch._dynamo

    if not fresh_backend.compile_supported(device):
        pytest.skip("torch.compile needs a C++ compiler on CPU" if device == "cpu" else "torch.compile needs Triton")
    torch._dynamo.reset()
    num_classes = 7
    results = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("DETFOCAL_COMPILE", mode)
        runs = []
        for n in (50, 64, 90, 123):
            generator = torch.Generator().manual_seed(n)
            logits = (torch.randn(2, n, num_classes, generator=generator) * 4).to(device).requires_grad_(True)
            labels = torch.randint(-1, num_classes + 1, (2, n), generator=generator).to(device)
            soft = torch.rand(2, n, num_classes, generator=generator).to(device)
            out_int = sigmoid_focal_loss(logits, labels, [0.2] * num_classes, 0.5, "mean")
            out_float = sigmoid_focal_loss(logits, soft, 0.25, 2.0, "sum")
            (grad,) = torch.autograd.grad(out_int + out_float, logits)
            runs.append((out_int.detach(), out_float.detach(), grad))
        results[mode] = runs
    for eager, compiled in zip(results["0"], results["1"]):
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # Four different N, two functions: symbolic shapes mean one graph per function, not per N.
    frame_counts = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frame_counts <= 4, frame_counts
    assert fresh_backend.backend()["last"] == "compiled"
