"""The QFL and VFL heads (detfocal.modeling.quality_heads) against float64 formulas, focal_head_loss and torchvision."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetHead
from torchvision.ops import box_iou

# Importing detfocal.modeling.quality_heads registers "qfl" and "vfl" (also before detfocal/__init__.py imports it).
from detfocal.modeling.heads import FocalClassificationHead, focal_head_loss, labels_from_matched_idxs
from detfocal.modeling.quality_heads import (QualityFocalClassificationHead, VarifocalClassificationHead,
                                             box_quality_targets)
from detfocal.modeling.retinanet import FocalRetinaNet, build_retinanet, retinanet_head_loss
from detfocal.utils.registry import HEADS

F64 = torch.float64
NUM_CLASSES = 3
HEAD_TYPES = {"qfl": QualityFocalClassificationHead, "vfl": VarifocalClassificationHead}


def make_batch(num_anchors: int = 12, dtype: torch.dtype = F64):
    """Two images: logits [2, N, 3], targets, matched_idxs with positives, background and ignored, and IoUs."""
    targets = [{"boxes": torch.rand(2, 4), "labels": torch.tensor([0, 2])},
               {"boxes": torch.rand(1, 4), "labels": torch.tensor([1])}]
    matched_idxs = [torch.randint(-2, 2, (num_anchors,)), torch.randint(-2, 1, (num_anchors,))]
    matched_idxs[0][:2] = torch.tensor([0, 1])
    matched_idxs[1][:2] = torch.tensor([0, -2])
    logits = (torch.randn(2, num_anchors, NUM_CLASSES, dtype=dtype) * 3).requires_grad_()
    quality = torch.rand(2, num_anchors, dtype=dtype)
    return logits, targets, matched_idxs, quality


def make_head(head_type: str, **kwargs) -> FocalClassificationHead:
    return HEAD_TYPES[head_type](8, 1, NUM_CLASSES, **kwargs)


# --------------------------------------------------------------------------------------
# The losses, against independent references.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_qfl_head_with_unit_quality_equals_focal_head_batch_loss(beta: float) -> None:
    logits, targets, matched_idxs, quality = make_batch()
    positive = torch.stack(matched_idxs) >= 0
    quality = torch.where(positive, 1.0, quality)  # 1 at positives; other values must be unread
    got = make_head("qfl", beta=beta).compute_loss(targets, {"cls_logits": logits}, matched_idxs, quality=quality)
    labels = labels_from_matched_idxs(targets, matched_idxs, NUM_CLASSES)
    expected = focal_head_loss(logits, labels, alpha=-1, gamma=beta, normalization="batch")
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, logits)[0], torch.autograd.grad(expected, logits)[0])


def test_qfl_head_equals_float64_formula_over_positive_count() -> None:
    logits, targets, matched_idxs, quality = make_batch()
    got = make_head("qfl", beta=2.0).compute_loss(targets, {"cls_logits": logits}, matched_idxs, quality=quality)
    labels = labels_from_matched_idxs(targets, matched_idxs, NUM_CLASSES)
    positive = (labels >= 0) & (labels < NUM_CLASSES)
    y = F.one_hot(labels.clamp(0, NUM_CLASSES), NUM_CLASSES + 1)[..., :NUM_CLASSES].to(F64) * quality[..., None]
    per_element = (F.binary_cross_entropy_with_logits(logits, y, reduction="none")
                   * (y - torch.sigmoid(logits)).abs() ** 2.0)
    expected = (per_element * (labels != -1)[..., None]).sum() / positive.sum()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, logits)[0], torch.autograd.grad(expected, logits)[0])


@pytest.mark.parametrize("iou_weighted", [True, False])
def test_vfl_head_equals_float64_formula_on_a_tiny_input(iou_weighted: bool) -> None:
    logits, targets, matched_idxs, quality = make_batch(num_anchors=5)
    quality[0, 1] = 0.0  # a positive whose box misses: trained as a negative
    got = make_head("vfl", alpha=0.75, gamma=2.0, iou_weighted=iou_weighted).compute_loss(
        targets, {"cls_logits": logits}, matched_idxs, quality=quality)
    expected = torch.zeros((), dtype=F64)
    num_positive = 0
    for image in range(2):
        for anchor in range(5):
            match = int(matched_idxs[image][anchor])
            if match == -2:
                continue
            label = int(targets[image]["labels"][match]) if match >= 0 else None
            num_positive += label is not None
            for cls in range(NUM_CLASSES):
                q = float(quality[image, anchor]) if cls == label else 0.0
                p = torch.sigmoid(logits[image, anchor, cls])
                if q > 0:
                    weight = q if iou_weighted else 1.0
                    expected = expected - weight * (q * torch.log(p) + (1 - q) * torch.log(1 - p))
                else:
                    expected = expected - 0.75 * p ** 2.0 * torch.log(1 - p)
    expected = expected / max(num_positive, 1)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, logits)[0], torch.autograd.grad(expected, logits)[0])


@pytest.mark.parametrize("head_type", ["qfl", "vfl"])
def test_reduce_none_equals_auto_in_one_process(head_type: str) -> None:
    logits, targets, matched_idxs, quality = make_batch()
    losses = [make_head(head_type, reduce=reduce).compute_loss(targets, {"cls_logits": logits}, matched_idxs,
                                                               quality=quality) for reduce in ("none", "auto")]
    assert make_head(head_type, reduce="none").reduce == "none"
    torch.testing.assert_close(losses[0], losses[1])


@pytest.mark.parametrize("head_type", ["qfl", "vfl"])
def test_negative_only_batch_gives_finite_loss_and_grads(head_type: str) -> None:
    logits, targets, matched_idxs, _ = make_batch()
    matched_idxs = [torch.full_like(matched, -1) for matched in matched_idxs]
    loss = make_head(head_type).compute_loss(targets, {"cls_logits": logits}, matched_idxs,
                                             quality=torch.zeros(2, 12, dtype=F64))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


# --------------------------------------------------------------------------------------
# IoU targets.
# --------------------------------------------------------------------------------------
def test_box_quality_targets_equal_box_iou_of_decoded_boxes_and_are_detached() -> None:
    box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0], [5.0, 5.0, 25.0, 15.0],
                             [60.0, 60.0, 70.0, 70.0]]),
               torch.tensor([[0.0, 0.0, 10.0, 10.0], [30.0, 10.0, 50.0, 50.0], [0.0, 0.0, 1.0, 1.0],
                             [8.0, 8.0, 16.0, 16.0]])]
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 20.0], [22.0, 18.0, 44.0, 38.0]])},
               {"boxes": torch.tensor([[28.0, 12.0, 52.0, 46.0]])}]
    matched_idxs = [torch.tensor([0, 1, -1, -2]), torch.tensor([-1, 0, -2, 0])]
    bbox_regression = (torch.randn(2, 4, 4) * 0.2).requires_grad_()
    bbox_regression.data[0, 0] = 0.0  # decodes to its anchor: IoU([0,0,10,10], [0,0,10,20]) = 1/2
    got = box_quality_targets(anchors, bbox_regression, targets, matched_idxs, box_coder)
    assert got.shape == (2, 4) and not got.requires_grad
    assert got[0, 0].item() == pytest.approx(0.5)
    expected = torch.zeros(2, 4)
    for image in range(2):
        for anchor in range(4):
            match = int(matched_idxs[image][anchor])
            if match >= 0:
                decoded = box_coder.decode_single(bbox_regression[image, anchor : anchor + 1].detach(),
                                                  anchors[image][anchor : anchor + 1])
                expected[image, anchor] = box_iou(decoded, targets[image]["boxes"][match : match + 1])[0, 0]
    torch.testing.assert_close(got, expected)
    assert (got[[0, 0, 1, 1], [2, 3, 0, 2]] == 0).all()  # background and ignored anchors
    assert got[1, 3] == 0 and (got[[0, 1], [1, 1]] > 0).all()  # a positive whose box misses, two that hit


def test_box_quality_targets_of_an_image_without_boxes_are_zero() -> None:
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]])]
    got = box_quality_targets(anchors, torch.randn(1, 2, 4), [{"boxes": torch.zeros(0, 4)}],
                              [torch.tensor([-1, -2])], BoxCoder((1.0, 1.0, 1.0, 1.0)))
    assert torch.equal(got, torch.zeros(1, 2))


# --------------------------------------------------------------------------------------
# The detector.
# --------------------------------------------------------------------------------------
def small_model(head_type: str) -> FocalRetinaNet:
    return build_retinanet(NUM_CLASSES, "resnet18", fpn_channels=32, min_size=64, max_size=64,
                           head={"type": head_type}).train()


def small_images_and_targets():
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=generator) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[5.0, 7.0, 33.0, 40.0], [37.0, 33.0, 60.0, 59.0]]),
                "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[13.0, 13.0, 53.0, 47.0]]), "labels": torch.tensor([1])}]
    return images, targets


def sgd_steps(model: FocalRetinaNet, lr: float, steps: int = 6) -> list[dict[str, float]]:
    """Train on one fixed batch; every step the classification head must get a finite, non-zero gradient."""
    images, targets = small_images_and_targets()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    history = []
    for _ in range(steps):
        losses = model(images, targets)
        assert set(losses) == {"classification", "bbox_regression"}
        optimizer.zero_grad()
        (losses["classification"] + losses["bbox_regression"]).backward()
        grad = model.head.classification_head.cls_logits.weight.grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        optimizer.step()
        history.append({key: value.item() for key, value in losses.items()})
    return history


@pytest.mark.slow
@pytest.mark.parametrize("head_type", ["qfl", "vfl"])
def test_retinanet_resnet18_with_iou_aware_head_loss_goes_down_with_boxes_held_fixed(head_type: str) -> None:
    model = small_model(head_type)
    assert type(model.head.classification_head) is HEAD_TYPES[head_type]
    # Zero, frozen box deltas decode to the anchors, so the IoU targets stay put while the classifier learns.
    for parameter in model.head.regression_head.bbox_reg.parameters():
        torch.nn.init.zeros_(parameter)
        parameter.requires_grad_(False)
    classification = [losses["classification"] for losses in sgd_steps(model, lr=0.2)]
    assert all(later < earlier for earlier, later in zip(classification, classification[1:]))
    assert classification[-1] < 0.99 * classification[0]


@pytest.mark.slow
@pytest.mark.parametrize("head_type", ["qfl", "vfl"])
def test_retinanet_resnet18_with_iou_aware_head_box_loss_goes_down(head_type: str) -> None:
    # With the boxes free, the IoU targets rise as the boxes improve and the classification loss
    # rises with them over the first steps (QFL ~ IoU^3 at the prior's p = 0.01), so only the box
    # loss is asserted here; the test above covers the classifier.
    history = sgd_steps(small_model(head_type), lr=0.05)
    assert history[-1]["bbox_regression"] < 0.95 * history[0]["bbox_regression"]


def test_retinanet_head_loss_leaves_focal_heads_to_torchvision() -> None:
    head = RetinaNetHead(8, 1, NUM_CLASSES)
    head.classification_head = FocalClassificationHead(8, 1, NUM_CLASSES)
    logits, targets, matched_idxs, _ = make_batch(num_anchors=6, dtype=torch.float32)
    targets = [dict(t, boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0]] * len(t["labels"]))) for t in targets]
    anchors = [torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 6)] * 2
    head_outputs = {"cls_logits": logits, "bbox_regression": torch.zeros(2, 6, 4)}
    got = retinanet_head_loss(head, targets, head_outputs, anchors, matched_idxs, BoxCoder((1.0, 1.0, 1.0, 1.0)))
    expected = head.compute_loss(targets, head_outputs, anchors, matched_idxs)
    assert set(got) == {"classification", "bbox_regression"}
    for key in got:
        torch.testing.assert_close(got[key], expected[key])


@pytest.mark.parametrize("head_type", ["qfl", "vfl"])
def test_state_dict_moves_strictly_between_iou_aware_focal_and_torchvision_heads(head_type: str) -> None:
    head = make_head(head_type)
    FocalClassificationHead(8, 1, NUM_CLASSES).load_state_dict(head.state_dict(), strict=True)
    RetinaNetClassificationHead(8, 1, NUM_CLASSES).load_state_dict(head.state_dict(), strict=True)


def test_registry_lists_qfl_and_vfl() -> None:
    assert {"focal", "qfl", "vfl"} <= set(HEADS.names())
    assert HEADS.get("qfl") is QualityFocalClassificationHead
    assert HEADS.get("vfl") is VarifocalClassificationHead
    assert HEADS.build({"type": "vfl", "alpha": 0.5}, in_channels=8, num_anchors=1, num_classes=2).alpha == 0.5


# --------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument.
# --------------------------------------------------------------------------------------
def _bad_quality_cases():
    return {
        "missing": ("quality", None),
        "wrong_shape": ("quality", torch.zeros(2, 11, dtype=F64)),
        "integer": ("quality", torch.zeros(2, 12, dtype=torch.long)),
        "above_one": ("quality", torch.full((2, 12), 1.5, dtype=F64)),
        "negative": ("quality", torch.full((2, 12), -0.1, dtype=F64)),
        "nan": ("quality", torch.full((2, 12), float("nan"), dtype=F64)),
    }


@pytest.mark.parametrize("head_type", ["qfl", "vfl"])
@pytest.mark.parametrize("case", list(_bad_quality_cases()))
def test_bad_quality_raises_value_error(head_type: str, case: str) -> None:
    name, quality = _bad_quality_cases()[case]
    logits, targets, matched_idxs, _ = make_batch()
    with pytest.raises(ValueError, match=name):
        make_head(head_type).compute_loss(targets, {"cls_logits": logits}, matched_idxs, quality=quality)


@pytest.mark.parametrize("head_type", ["qfl", "vfl"])
def test_torchvision_head_compute_loss_without_quality_raises_value_error(head_type: str) -> None:
    head = RetinaNetHead(8, 1, NUM_CLASSES)
    head.classification_head = make_head(head_type)
    logits, targets, matched_idxs, _ = make_batch(num_anchors=6, dtype=torch.float32)
    with pytest.raises(ValueError, match="quality"):
        head.classification_head.compute_loss(targets, {"cls_logits": logits}, matched_idxs)


@pytest.mark.parametrize(("name", "build"), [
    ("beta", lambda: QualityFocalClassificationHead(8, 1, 3, beta=-1.0)),
    ("alpha", lambda: VarifocalClassificationHead(8, 1, 3, alpha=float("nan"))),
    ("gamma", lambda: VarifocalClassificationHead(8, 1, 3, gamma=-2.0)),
    ("iou_weighted", lambda: VarifocalClassificationHead(8, 1, 3, iou_weighted="yes")),
    ("normalization", lambda: build_retinanet(3, "resnet18", fpn_channels=32,
                                              head={"type": "qfl", "normalization": "image"})),
    ("reduce", lambda: QualityFocalClassificationHead(8, 1, 3, reduce="all")),
], ids=["beta", "alpha", "gamma", "iou_weighted", "normalization", "reduce"])
def test_bad_head_arguments_raise_value_error(name: str, build) -> None:
    with pytest.raises(ValueError, match=name):
        build()


def test_box_quality_targets_bad_input_raises_value_error() -> None:
    anchors = [torch.zeros(3, 4)]
    targets = [{"boxes": torch.zeros(1, 4)}]
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="bbox_regression"):
        box_quality_targets(anchors, torch.zeros(1, 3, 5), targets, [torch.zeros(3, dtype=torch.long)], coder)
    with pytest.raises(ValueError, match="anchors"):
        box_quality_targets([torch.zeros(2, 4)], torch.zeros(1, 3, 4), targets, [torch.zeros(3, dtype=torch.long)],
                            coder)
    with pytest.raises(ValueError, match="matched_idxs"):
        box_quality_targets(anchors, torch.zeros(1, 3, 4), targets, [torch.tensor([0, 1, -1])], coder)
