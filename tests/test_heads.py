"""FocalClassificationHead and focal_head_loss against torchvision, float64 formulas and DDP."""
from __future__ import annotations

import math
import os
import socket
import tempfile
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.retinanet import RetinaNetClassificationHead
from torchvision.ops import box_iou

from conftest import LOSS_SCALES, assert_half_grad_matches_float64, backward_ops_on
from detfocal.modeling.heads import FocalClassificationHead, focal_head_loss, labels_from_matched_idxs
from detfocal.modeling.quality_heads import QualityFocalClassificationHead, VarifocalClassificationHead

NUM_CLASSES = 4


def reference_focal_sum(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """The paper's eq. 5 with one-hot targets, in float64; labels C = background, -1 = ignore."""
    logits = logits.double()
    num_classes = logits.shape[-1]
    target = F.one_hot(labels.clamp(min=0), num_classes + 1)[..., :num_classes].double()
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    loss = alpha_t * (1 - p_t) ** gamma * ce
    return (loss * (labels != -1).unsqueeze(-1)).sum()


def make_batch(num_images: int = 3, num_anchors: int = 60, dtype=torch.float32, device="cpu"):
    """Logits, targets and matched_idxs covering matches, background, ignored and a box-less image, on ``device``."""
    generator = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(num_images, num_anchors, NUM_CLASSES, generator=generator)).to(dtype)
    targets, matched_idxs = [], []
    for index in range(num_images):
        num_boxes = 0 if index == num_images - 1 else 3
        labels = torch.randint(0, NUM_CLASSES, (num_boxes,), generator=generator)
        targets.append({"boxes": torch.rand(num_boxes, 4, generator=generator), "labels": labels})
        matched = torch.randint(-2, max(num_boxes, 0), (num_anchors,), generator=generator)
        if num_boxes == 0:
            matched = torch.full((num_anchors,), -1)
        matched_idxs.append(matched)
    targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
    return logits.to(device), targets, [matched.to(device) for matched in matched_idxs]


# ----------------------------------------------------------------------------------
# Normalisation modes.
# ----------------------------------------------------------------------------------
def test_image_normalization_equals_torchvision_compute_loss_values_and_grads(device):
    logits, targets, matched_idxs = make_batch(device=device)
    torchvision_head = RetinaNetClassificationHead(8, 9, NUM_CLASSES).to(device)
    focal_head = FocalClassificationHead(8, 9, NUM_CLASSES, normalization="image").to(device)
    expected_logits = logits.clone().requires_grad_()
    expected = torchvision_head.compute_loss(targets, {"cls_logits": expected_logits}, matched_idxs)
    expected.backward()
    got_logits = logits.clone().requires_grad_()
    got = focal_head.compute_loss(targets, {"cls_logits": got_logits}, matched_idxs)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_logits.grad, expected_logits.grad, rtol=1e-5, atol=1e-5)


def test_batch_normalization_equals_sum_over_total_positives_float64(device):
    logits, targets, matched_idxs = make_batch(dtype=torch.float64, device=device)
    labels = labels_from_matched_idxs(targets, matched_idxs, NUM_CLASSES)
    num_positive = int(((labels >= 0) & (labels < NUM_CLASSES)).sum())
    assert num_positive > 1
    expected_logits = logits.clone().requires_grad_()
    expected = reference_focal_sum(expected_logits, labels) / num_positive
    expected.backward()
    got_logits = logits.clone().requires_grad_()
    head = FocalClassificationHead(8, 9, NUM_CLASSES).to(device)  # "batch" is the default
    got = head.compute_loss(targets, {"cls_logits": got_logits}, matched_idxs)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_logits.grad, expected_logits.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("normalization", ["batch", "ema"])
def test_head_loss_divides_in_forward_so_backward_makes_no_pass_over_the_logits(normalization):
    logits, targets, matched_idxs = make_batch()
    labels = labels_from_matched_idxs(targets, matched_idxs, NUM_CLASSES)
    logits.requires_grad_()
    ema = torch.tensor([100.0]) if normalization == "ema" else None
    ops = backward_ops_on(logits.shape, lambda: focal_head_loss(logits, labels, normalization=normalization,
                                                                num_foreground_ema=ema))
    assert ops == []
    num_positive = int(((labels >= 0) & (labels < NUM_CLASSES)).sum())
    divide_by = num_positive if normalization == "batch" else float(ema)
    x64 = logits.detach().double().requires_grad_()
    (reference_focal_sum(x64, labels) / divide_by).backward()
    torch.testing.assert_close(logits.grad.double(), x64.grad, rtol=1e-5, atol=1e-9)


def test_a_refused_ema_call_leaves_the_buffer_alone():
    logits, targets, matched_idxs = make_batch()
    labels = labels_from_matched_idxs(targets, matched_idxs, NUM_CLASSES)
    ema = torch.tensor([100.0])
    with pytest.raises(ValueError, match="gamma"):
        focal_head_loss(logits, labels, gamma=-1.0, normalization="ema", num_foreground_ema=ema)
    bad = labels.clone()
    bad[0, 0] = NUM_CLASSES + 7
    with pytest.raises(ValueError):
        focal_head_loss(logits, bad, normalization="ema", num_foreground_ema=ema)
    assert ema.item() == 100.0


def test_batch_normalizer_keeps_float64_exact_under_a_world_size(monkeypatch):
    from detfocal.modeling import head_loss

    logits, targets, matched_idxs = make_batch(dtype=torch.float64)
    labels = labels_from_matched_idxs(targets, matched_idxs, NUM_CLASSES)
    num_positive = int(((labels >= 0) & (labels < NUM_CLASSES)).sum())
    monkeypatch.setattr(head_loss, "_count_over", lambda foreground, group: (foreground.sum(), 3))
    got = focal_head_loss(logits, labels)
    torch.testing.assert_close(got, reference_focal_sum(logits, labels) * 3 / num_positive, rtol=1e-14, atol=0)


def test_labels_from_matched_idxs_gathers_box_labels_background_and_ignore(device):
    targets = [{"labels": torch.tensor([2, 0], device=device)},
               {"labels": torch.zeros(0, dtype=torch.long, device=device)}]
    matched_idxs = [torch.tensor([1, -1, 0, -2], device=device), torch.tensor([-1, -2, -1, -1], device=device)]
    labels = labels_from_matched_idxs(targets, matched_idxs, NUM_CLASSES)
    assert labels.device.type == device
    assert labels.tolist() == [[0, NUM_CLASSES, 2, -1], [NUM_CLASSES, -1, NUM_CLASSES, NUM_CLASSES]]


def _ema_steps(head: FocalClassificationHead, steps):
    losses = []
    for logits, labels in steps:
        matched = torch.where(labels == NUM_CLASSES, -1,
                              torch.where(labels == -1, -2, torch.arange(labels.shape[1], device=labels.device)))
        targets = [{"labels": row.clamp(0, NUM_CLASSES - 1)} for row in labels]
        losses.append(head.compute_loss(targets, {"cls_logits": logits}, list(matched)))
    return losses


def _ema_batch(seed: int, num_positive: int):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 40, NUM_CLASSES, generator=generator, dtype=torch.float64)
    labels = torch.full((2, 40), NUM_CLASSES)
    labels.view(-1)[:num_positive] = torch.randint(0, NUM_CLASSES, (num_positive,), generator=generator)
    labels[1, -3:] = -1
    return logits, labels


def test_ema_normalization_follows_detectron2_formula(device):
    head = FocalClassificationHead(8, 9, NUM_CLASSES, normalization="ema", ema_momentum=0.9).double().train()
    head = head.to(device)
    steps = [tuple(t.to(device) for t in _ema_batch(seed, count)) for seed, count in ((0, 7), (1, 0), (2, 30))]
    losses = _ema_steps(head, steps)
    # detectron2 RetinaNet.losses: normalizer = _ema_update(max(num_pos, 1), initial 100, momentum 0.9).
    ema = 100.0
    for (logits, labels), loss in zip(steps, losses):
        num_positive = int(((labels >= 0) & (labels < NUM_CLASSES)).sum())
        ema = 0.9 * ema + 0.1 * max(num_positive, 1)
        torch.testing.assert_close(loss, reference_focal_sum(logits, labels) / ema, rtol=1e-10, atol=1e-12)
    assert head.num_foreground_ema.item() == pytest.approx(ema, rel=1e-12)


def test_ema_buffer_survives_state_dict_round_trip():
    head = FocalClassificationHead(8, 9, NUM_CLASSES, normalization="ema").double().train()
    _ema_steps(head, [_ema_batch(0, 9)])
    restored = FocalClassificationHead(8, 9, NUM_CLASSES, normalization="ema").double()
    restored.load_state_dict(head.state_dict(), strict=True)
    assert restored.num_foreground_ema.item() == head.num_foreground_ema.item() != 100.0
    next_step = [_ema_batch(1, 4)]
    torch.testing.assert_close(_ema_steps(restored, next_step)[0], _ema_steps(head, next_step)[0])


def test_ema_not_updated_in_eval_mode():
    head = FocalClassificationHead(8, 9, NUM_CLASSES, normalization="ema").double().eval()
    logits, labels = _ema_batch(0, 12)
    loss = _ema_steps(head, [(logits, labels)])[0]
    assert head.num_foreground_ema.item() == 100.0
    torch.testing.assert_close(loss, reference_focal_sum(logits, labels) / 100.0)


def test_extra_buffer_exists_only_with_ema():
    assert "num_foreground_ema" not in FocalClassificationHead(8, 9, 3).state_dict()
    assert "num_foreground_ema" not in FocalClassificationHead(8, 9, 3, normalization="image").state_dict()
    assert "num_foreground_ema" in FocalClassificationHead(8, 9, 3, normalization="ema").state_dict()


# ----------------------------------------------------------------------------------
# Degenerate batches.
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("normalization", ["batch", "image", "ema"])
def test_negative_only_images_give_finite_loss_and_grads(normalization, device):
    logits = torch.randn(2, 50, NUM_CLASSES).to(device).requires_grad_()
    targets = [{"boxes": torch.zeros(0, 4, device=device), "labels": torch.zeros(0, dtype=torch.long, device=device)}
               for _ in range(2)]
    head = FocalClassificationHead(8, 9, NUM_CLASSES, normalization=normalization).to(device)
    loss = head.compute_loss(targets, {"cls_logits": logits}, [torch.full((50,), -1, device=device)] * 2)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(logits.grad).all()
    if normalization == "batch":  # no positives: the sum over all negatives, divided by 1
        torch.testing.assert_close(loss.double(), reference_focal_sum(logits.detach(), torch.full((2, 50), 4,
                                                                                                 device=device)))


@pytest.mark.parametrize("normalization", ["batch", "image", "ema"])
def test_all_ignored_images_give_zero_loss_and_grads(normalization):
    logits = torch.randn(2, 50, NUM_CLASSES, requires_grad=True)
    targets = [{"labels": torch.tensor([1])} for _ in range(2)]
    head = FocalClassificationHead(8, 9, NUM_CLASSES, normalization=normalization)
    loss = head.compute_loss(targets, {"cls_logits": logits}, [torch.full((50,), -2)] * 2)
    loss.backward()
    assert loss.item() == 0.0
    assert (logits.grad == 0).all()


@pytest.mark.parametrize("normalization", ["batch", "image", "ema"])
@pytest.mark.parametrize("shape", [(0, 50), (2, 0)], ids=["no_images", "no_anchors"])
def test_empty_batch_gives_zero_loss_and_zero_grads(normalization, shape):
    logits = torch.randn(*shape, NUM_CLASSES, requires_grad=True)
    ema = torch.tensor(100.0) if normalization == "ema" else None
    loss = focal_head_loss(logits, torch.zeros(shape, dtype=torch.long), normalization=normalization,
                           num_foreground_ema=ema)
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad.shape == logits.shape and (logits.grad == 0).all()


# ----------------------------------------------------------------------------------
# Mixed precision: fp16/bf16 logits against float64 at GradScaler's loss scales.
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("normalization", ["batch", "image", "ema"])
def test_half_precision_head_gradient_is_float64_gradient_rounded_once(normalization, dtype, device):
    logits = (torch.randn(2, 500, 8) * 3 - 4).to(device)
    labels = torch.full((2, 500), 8, device=device)
    labels[0, :30], labels[1, :3], labels[1, 3:6] = 3, 5, -1

    def loss_fn(x):
        ema = torch.tensor(100.0, device=device) if normalization == "ema" else None
        return focal_head_loss(x, labels, normalization=normalization, num_foreground_ema=ema)

    for scale in LOSS_SCALES:
        assert_half_grad_matches_float64(loss_fn, logits.to(dtype), scale)


# ----------------------------------------------------------------------------------
# Layout, initialisation and torchvision compatibility.
# ----------------------------------------------------------------------------------
def test_prior_probability_initialisation():
    head = FocalClassificationHead(16, 9, NUM_CLASSES, prior_probability=0.01)
    torch.testing.assert_close(head.cls_logits.bias.sigmoid(), torch.full((9 * NUM_CLASSES,), 0.01))
    assert head.cls_logits.bias[0].item() == pytest.approx(-math.log(99), rel=1e-6)
    conv_weights = torch.cat([m.weight.flatten() for m in head.modules() if isinstance(m, nn.Conv2d)])
    assert conv_weights.mean().abs() < 1e-3 and conv_weights.std().item() == pytest.approx(0.01, rel=0.05)
    assert all((m.bias == 0).all() for m in head.conv.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("norm_layer", [None, partial(nn.GroupNorm, 8)], ids=["plain", "groupnorm"])
def test_state_dict_loads_into_torchvision_head_and_back_strict(norm_layer):
    features = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4)]
    focal_head = FocalClassificationHead(16, 9, NUM_CLASSES, norm_layer=norm_layer)
    torchvision_head = RetinaNetClassificationHead(16, 9, NUM_CLASSES, norm_layer=norm_layer)
    torchvision_head.load_state_dict(focal_head.state_dict(), strict=True)
    torch.testing.assert_close(torchvision_head(features), focal_head(features), rtol=0, atol=0)
    other = RetinaNetClassificationHead(16, 9, NUM_CLASSES, norm_layer=norm_layer)
    focal_head.load_state_dict(other.state_dict(), strict=True)
    torch.testing.assert_close(focal_head(features), other(features), rtol=0, atol=0)


# ----------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------
def test_matched_idxs_of_wrong_length_raise_value_error():
    logits, targets, matched_idxs = make_batch()
    head = FocalClassificationHead(8, 9, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"matched_idxs\[0\] must have shape"):
        head.compute_loss(targets, {"cls_logits": logits}, [matched_idxs[0][:-1]] + matched_idxs[1:])
    with pytest.raises(ValueError, match="one entry per image"):
        head.compute_loss(targets, {"cls_logits": logits}, matched_idxs[:-1])


def test_labels_of_wrong_shape_raise_value_error():
    with pytest.raises(ValueError, match=r"labels must have shape cls_logits.shape\[:2\] = \(2, 10\)"):
        focal_head_loss(torch.randn(2, 10, 3), torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must be an integer tensor \[M\]"):
        labels_from_matched_idxs([{"labels": torch.zeros(2, 1, dtype=torch.long)}],
                                 [torch.zeros(5, dtype=torch.long)], 3)


@pytest.mark.parametrize("bad", [NUM_CLASSES + 5, -2])
@pytest.mark.parametrize("normalization", ["batch", "image"])
def test_focal_head_loss_names_labels_not_targets_for_a_label_out_of_range(bad, normalization):
    labels = torch.full((2, 10), NUM_CLASSES)
    labels[1, 3] = bad
    with pytest.raises(ValueError, match=rf"^labels holds {bad}, expected labels in \[0, {NUM_CLASSES}\]"):
        focal_head_loss(torch.randn(2, 10, NUM_CLASSES), labels, normalization=normalization)


def test_every_public_name_of_heads_stays_importable_from_heads_and_modeling():
    import detfocal.modeling as modeling
    from detfocal.modeling import head_loss, heads

    for name in heads.__all__:
        assert hasattr(heads, name), name
        if hasattr(head_loss, name):
            assert getattr(heads, name) is getattr(head_loss, name), name
    for name in ("FocalClassificationHead", "focal_head_loss", "labels_from_matched_idxs"):
        assert getattr(modeling, name) is getattr(heads, name)
    assert heads.FocalClassificationHead.compute_loss.__module__ == "detfocal.modeling.heads"


def test_target_label_not_below_num_classes_raises_value_error():
    logits, targets, matched_idxs = make_batch()
    targets[0]["labels"] = torch.tensor([0, NUM_CLASSES, 1])
    with pytest.raises(ValueError, match=rf"holds {NUM_CLASSES}, expected labels in \[0, num_classes={NUM_CLASSES}\)"):
        FocalClassificationHead(8, 9, NUM_CLASSES).compute_loss(targets, {"cls_logits": logits}, matched_idxs)


def test_head_num_classes_mismatch_raises_value_error():
    logits, targets, matched_idxs = make_batch()
    with pytest.raises(ValueError, match="disagree on num_classes"):
        FocalClassificationHead(8, 9, NUM_CLASSES + 1).compute_loss(targets, {"cls_logits": logits}, matched_idxs)


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
def test_non_finite_gamma_raises_value_error_in_every_head(value):
    for build in (lambda: FocalClassificationHead(8, 9, 3, gamma=value),
                  lambda: QualityFocalClassificationHead(8, 9, 3, beta=value),
                  lambda: VarifocalClassificationHead(8, 9, 3, gamma=value),
                  lambda: focal_head_loss(torch.randn(1, 5, 3), torch.zeros(1, 5, dtype=torch.long), gamma=value)):
        with pytest.raises(ValueError, match=rf"^(gamma|beta) holds {value}, expected a finite real >= 0$"):
            build()


def test_bad_reduce_raises_value_error_and_none_equals_auto_in_one_process():
    logits, labels = _ema_batch(0, 9)
    with pytest.raises(ValueError, match=r"^reduce holds 'all', expected 'auto', 'none' or a torch.distributed"):
        focal_head_loss(logits, labels, reduce="all")
    with pytest.raises(ValueError, match=r"^reduce holds"):
        FocalClassificationHead(8, 9, NUM_CLASSES, reduce=None)
    assert FocalClassificationHead(8, 9, NUM_CLASSES, reduce="none").reduce == "none"
    torch.testing.assert_close(focal_head_loss(logits, labels, reduce="none"), focal_head_loss(logits, labels))


def test_bad_normalization_and_missing_ema_buffer_raise_value_error():
    with pytest.raises(ValueError, match="normalization must be one of"):
        FocalClassificationHead(8, 9, 3, normalization="mean")
    with pytest.raises(ValueError, match="needs num_foreground_ema"):
        focal_head_loss(torch.randn(1, 5, 3), torch.zeros(1, 5, dtype=torch.long), normalization="ema")


# ----------------------------------------------------------------------------------
# DDP: two gloo processes on CPU equal one process holding the whole batch.
# ----------------------------------------------------------------------------------
def _ddp_cases():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(4, 30, 6, generator=generator, dtype=torch.float64)
    many = torch.full((4, 30), NUM_CLASSES)
    many[0, :9] = torch.randint(0, NUM_CLASSES, (9,), generator=generator)  # rank 0 holds all positives
    many[3, 2:5] = torch.tensor([1, 0, 3])  # ... but three, which rank 1 holds
    many[1, -4:] = -1
    single = torch.full((4, 30), NUM_CLASSES)
    single[3, 7] = 2  # one positive in the global batch: fewer than processes
    linear = nn.Linear(6, NUM_CLASSES).double()
    # name: (labels, normalization, reduce); "group" is a ProcessGroup of both ranks made by the workers.
    return {"linear": linear.state_dict(), "features": features,
            "cases": {"batch_many": (many, "batch", "auto"), "batch_single": (single, "batch", "auto"),
                      "ema_many": (many, "ema", "auto"), "batch_group": (many, "batch", "group")}}


def _run_case(linear: nn.Module, features, labels, normalization, reduce="auto"):
    ema = torch.tensor(100.0, dtype=torch.float64) if normalization == "ema" else None
    loss = focal_head_loss(linear(features), labels, normalization=normalization, num_foreground_ema=ema,
                           reduce=reduce)
    loss.backward()
    return loss.detach(), ema


def _global_batch_reference(linear: nn.Module, features, labels, normalization, world_size: int):
    """What W processes should average to, in float64: the summed loss over the global count.

    "batch": sum / max(count, 1) (one process holding the global batch). "ema": detectron2's
    per-GPU normaliser, 0.9 * 100 + 0.1 * max(count, 1) / W, which the W processes share, so
    their average is sum / (W * normaliser).
    """
    loss_sum = reference_focal_sum(linear(features), labels)
    count = max(int(((labels >= 0) & (labels < NUM_CLASSES)).sum()), 1)
    ema = None
    if normalization == "batch":
        loss = loss_sum / count
    else:
        ema = torch.tensor(0.9 * 100.0 + 0.1 * count / world_size, dtype=torch.float64)
        loss = loss_sum / (world_size * ema)
    loss.backward()
    return loss.detach(), ema


def _ddp_worker(rank: int, world_size: int, port: int, directory: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from detfocal.utils import comm as distributed

    try:
        init = distributed.init_distributed(backend="gloo")
        group = dist.new_group(list(range(world_size)))
        data = torch.load(Path(directory) / "data.pt")
        results = {"init": init[:3], "world_size": distributed.get_world_size(), "main": distributed.is_main_process()}
        half = data["features"].shape[0] // world_size
        rows = slice(rank * half, (rank + 1) * half)
        for name, (labels, normalization, reduce) in data["cases"].items():
            linear = nn.Linear(6, NUM_CLASSES).double()
            linear.load_state_dict(data["linear"])
            model = DistributedDataParallel(linear)
            loss, ema = _run_case(model, data["features"][rows], labels[rows], normalization,
                                  group if reduce == "group" else reduce)
            results[name] = (loss, [p.grad.clone() for p in linear.parameters()], ema)
        if rank == 0:
            # A loss on one rank only (a rank-0 validation loss): any collective here would hang,
            # since rank 1 never joins it. The parent's join timeout turns a hang into a failure.
            linear = nn.Linear(6, NUM_CLASSES).double()
            linear.load_state_dict(data["linear"])
            labels = data["cases"]["batch_many"][0][rows]
            results["rank0_none"] = focal_head_loss(linear(data["features"][rows]), labels, reduce="none").detach()
            with torch.no_grad():
                results["rank0_auto_no_grad"] = focal_head_loss(linear(data["features"][rows]), labels)
        torch.save(results, Path(directory) / f"rank{rank}.pt")
    finally:
        distributed.cleanup()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_normalization_equals_single_process_on_global_batch_and_reduce_none_does_not_hang():
    data = _ddp_cases()
    with tempfile.TemporaryDirectory() as directory:
        torch.save(data, Path(directory) / "data.pt")
        context = mp.get_context("spawn")
        port = _free_port()
        processes = [context.Process(target=_ddp_worker, args=(rank, 2, port, directory)) for rank in range(2)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=120)
        hung = [process.is_alive() for process in processes]
        for process in processes:
            if process.is_alive():
                process.kill()
        assert not any(hung), "a worker hung (a collective on one rank only?)"
        assert [process.exitcode for process in processes] == [0, 0]
        results = [torch.load(Path(directory) / f"rank{rank}.pt") for rank in range(2)]

    assert [r["init"] for r in results] == [(0, 0, 2), (1, 1, 2)]
    assert [r["world_size"] for r in results] == [2, 2] and [r["main"] for r in results] == [True, False]
    for name, (labels, normalization, _) in data["cases"].items():
        linear = nn.Linear(6, NUM_CLASSES).double()
        linear.load_state_dict(data["linear"])
        expected_loss, expected_ema = _global_batch_reference(linear, data["features"], labels, normalization, 2)
        mean_loss = (results[0][name][0] + results[1][name][0]) / 2
        torch.testing.assert_close(mean_loss, expected_loss, rtol=1e-12, atol=1e-12)
        for rank in range(2):  # DDP has averaged the gradients on each process
            for got, param in zip(results[rank][name][1], linear.parameters()):
                torch.testing.assert_close(got, param.grad, rtol=1e-12, atol=1e-12)
            if expected_ema is not None:
                torch.testing.assert_close(results[rank][name][2], expected_ema)

    # Rank 0 alone: its own batch over its own positives, with and without grad mode.
    linear = nn.Linear(6, NUM_CLASSES).double()
    linear.load_state_dict(data["linear"])
    labels = data["cases"]["batch_many"][0][:2]
    expected = _global_batch_reference(linear, data["features"][:2], labels, "batch", 1)[0]
    torch.testing.assert_close(results[0]["rank0_none"], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0]["rank0_auto_no_grad"], expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------
# A custom detector trained with focal_head_loss (the README's example).
# ----------------------------------------------------------------------------------
class TinyDetector(nn.Module):
    """One feature map at stride 8 with one 24 px anchor per cell: the smallest dense detector."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU())
        self.cls_logits = nn.Conv2d(32, num_classes, 3, padding=1)
        nn.init.normal_(self.cls_logits.weight, std=0.01)
        nn.init.constant_(self.cls_logits.bias, -math.log(99))  # prior probability 0.01

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.cls_logits(self.body(images))  # (B, C, H, W)
        return logits.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)


def grid_anchors(image_size: int = 64, stride: int = 8, size: float = 24.0) -> torch.Tensor:
    centres = torch.arange(stride / 2, image_size, stride)
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")  # row-major, as the logits
    return torch.stack([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2], dim=-1).reshape(-1, 4)


def assign_labels(anchors, boxes, labels, num_classes, fg_iou=0.5, bg_iou=0.4) -> torch.Tensor:
    """IoU >= 0.5: the box's label; < 0.4: background (num_classes); in between: ignored (-1)."""
    iou, index = box_iou(boxes, anchors).max(dim=0)  # (M, N) -> (N,)
    assigned = labels[index]
    assigned = torch.where(iou < bg_iou, num_classes, assigned)
    return torch.where((iou >= bg_iou) & (iou < fg_iou), -1, assigned)


def test_custom_detector_trains_with_focal_head_loss():
    num_classes = 2
    generator = torch.Generator().manual_seed(0)
    images = torch.zeros(8, 3, 64, 64)
    boxes, labels = [], []
    for i in range(8):  # a 24 px square per image; its colour is its class
        x, y = torch.randint(0, 40, (2,), generator=generator).tolist()
        label = i % num_classes
        images[i, label, y:y + 24, x:x + 24] = 1.0
        boxes.append(torch.tensor([[x, y, x + 24, y + 24]], dtype=torch.float32))
        labels.append(torch.tensor([label]))
    anchors = grid_anchors()
    targets = torch.stack([assign_labels(anchors, b, l, num_classes) for b, l in zip(boxes, labels)])  # (B, N)

    model = TinyDetector(num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = focal_head_loss(model(images), targets, alpha=0.25, gamma=2.0, normalization="batch")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert ((targets >= 0) & (targets < num_classes)).sum() >= 8
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]
