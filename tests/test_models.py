"""build_retinanet, convert_retinanet, crowd-aware matching and the registries, against torchvision."""
from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detfocal.modeling.backbones import LastLevelP6P7Fp32
from detfocal.modeling.heads import FocalClassificationHead, focal_head_loss, labels_from_matched_idxs
from detfocal.modeling import retinanet
from detfocal.modeling.matching import anchor_crowd_ioa, match_anchors, match_anchors_batched, split_crowd
from detfocal.modeling.retinanet import (CachedAnchorGenerator, FocalRetinaNet, build_retinanet, convert_retinanet,
                                         resolve_backbone_weights)
from detfocal.utils.registry import BACKBONES, DETECTORS, HEADS, Registry

SMALL = {"fpn_channels": 64, "min_size": 128, "max_size": 128}


def small_batch():
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 128, generator=generator) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 64.0, 120.0, 110.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[30.0, 30.0, 100.0, 90.0]]), "labels": torch.tensor([1])},
    ]
    return images, targets


# ----------------------------------------------------------------------------------
# Crowd-aware matching.
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("crowd_dtype", [torch.int64, torch.bool])
def test_background_anchors_inside_crowd_boxes_become_ignored(crowd_dtype):
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],      # 0: matches the real box (IoU 1)
        [100.0, 100.0, 110.0, 110.0],  # 1: inside the crowd box: IoA 1
        [95.0, 100.0, 105.0, 110.0],   # 2: half inside: IoA 0.5 -> ignored (>=)
        [92.0, 100.0, 102.0, 110.0],   # 3: IoA 0.2 -> background
        [300.0, 300.0, 310.0, 310.0],  # 4: far from everything: background
        [2.0, 0.0, 12.0, 10.0],        # 5: IoU 0.67 with the real box: stays matched
    ])
    target = {"boxes": torch.tensor([[100.0, 100.0, 200.0, 200.0], [0.0, 0.0, 10.0, 10.0]]),
              "labels": torch.tensor([1, 0]), "iscrowd": torch.tensor([1, 0]).to(crowd_dtype)}
    recorded = {}

    class RecordingHead(nn.Module):
        def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
            recorded.update(targets=targets, matched_idxs=matched_idxs)
            return {}

    backbone = nn.Identity()
    backbone.out_channels = 8
    model = FocalRetinaNet(backbone, 2, head=RecordingHead(), proposal_matcher=Matcher(0.5, 0.4, False))
    model.compute_loss([target], {}, [anchors])
    # The heads see the boxes as given, and matched_idxs index into them: the crowd box (0) is
    # never matched, the real box is 1.
    assert recorded["targets"][0]["boxes"].tolist() == [[100.0, 100.0, 200.0, 200.0], [0.0, 0.0, 10.0, 10.0]]
    assert recorded["targets"][0]["labels"].tolist() == [1, 0]
    assert recorded["matched_idxs"][0].tolist() == [1, -2, -2, -1, -1, 1]


def test_anchor_crowd_ioa_is_intersection_over_anchor_area():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 25.0], [3.0, 3.0, 3.0, 8.0]])
    crowd = torch.tensor([[0.0, 0.0, 20.0, 10.0], [10.0, 10.0, 30.0, 30.0]])
    expected = torch.tensor([[100.0, 0.0], [50.0, 75.0], [0.0, 0.0]]) / torch.tensor([[100.0], [200.0], [1.0]])
    torch.testing.assert_close(anchor_crowd_ioa(anchors, crowd), expected)  # a zero-area anchor has IoA 0


def test_crowd_only_image_has_no_positives_and_ignores_covered_anchors():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    matched = match_anchors(anchors, torch.zeros(0, 4), Matcher(0.5, 0.4, True),
                            crowd_boxes=torch.tensor([[0.0, 0.0, 20.0, 20.0]]))
    assert matched.tolist() == [-2, -1]


class PerImageMatcher(Matcher):
    """torchvision's Matcher under another type: FocalRetinaNet then matches image by image with it."""


def matching_batch(anchor_dtype=torch.float32):
    """Anchors with duplicates (ties between anchors), and 4 images: a duplicated box (ties between
    boxes), no boxes but a crowd box, a box far from every anchor (IoU 0 ties), 5 boxes and 2 crowd."""
    generator = torch.Generator().manual_seed(0)

    def random_boxes(count, low=0.0, high=60.0):
        xy = low + torch.rand(count, 2, generator=generator) * (high - low)
        return torch.cat([xy, xy + 4 + torch.rand(count, 2, generator=generator) * 30], dim=1)

    anchors = random_boxes(200)
    anchors[100:110] = anchors[:10]
    first = random_boxes(3)
    boxes = [torch.cat([first, first[:1]]), torch.zeros(0, 4), random_boxes(1, 500.0, 600.0), random_boxes(5)]
    crowd = [None, random_boxes(1), torch.zeros(0, 4), random_boxes(2)]
    return anchors.to(anchor_dtype), boxes, crowd


@pytest.mark.parametrize("anchor_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("low_quality", [True, False], ids=["low_quality", "thresholds_only"])
def test_batched_matching_equals_torchvision_matcher_image_by_image(anchor_dtype, low_quality, device):
    anchors, boxes, crowd = matching_batch(anchor_dtype)
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=low_quality)
    expected = torch.stack([match_anchors(anchors, b, matcher, c) for b, c in zip(boxes, crowd)])  # on the CPU
    got = match_anchors_batched(anchors.to(device), [b.to(device) for b in boxes], matcher,
                                [c if c is None else c.to(device) for c in crowd])
    assert got.dtype == torch.int64 and got.device.type == device and torch.equal(got.cpu(), expected)
    assert (got == 0).any() and (got == -2).any()  # the batch exercises matches and ignored anchors


def flagged_batch(anchor_dtype=torch.float32):
    """matching_batch's images with their crowd boxes among the real ones (after the first), flagged by
    ``iscrowd``: no flags at all, crowd only, a box far away, 5 boxes and 2 crowd; plus an image of crowd
    boxes only and one whose int64 flags (as CocoDetection's) are all 0."""
    anchors, boxes, crowd = matching_batch(anchor_dtype)
    all_boxes, flags = [boxes[0]], [None]
    for b, c in zip(boxes[1:], crowd[1:]):
        all_boxes.append(torch.cat([b[:1], c, b[1:]]))
        flags.append(torch.cat([torch.zeros(len(b[:1])), torch.ones(len(c)), torch.zeros(len(b[1:]))]).bool())
    all_boxes += [crowd[3], boxes[3]]
    flags += [torch.ones(2, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)]
    return anchors, all_boxes, flags


def split_crowd_reference(anchors, boxes, iscrowd, matcher):
    """Per image on the CPU: split_crowd, match_anchors on the real boxes, indices mapped back to ``boxes``."""
    if iscrowd is None:
        return match_anchors(anchors, boxes, matcher)
    kept, crowd_boxes = split_crowd({"boxes": boxes, "iscrowd": iscrowd})
    matched = match_anchors(anchors, kept["boxes"], matcher, crowd_boxes)
    position = [index for index, flag in enumerate(iscrowd.tolist()) if not flag]  # kept box k is box position[k]
    return torch.tensor([position[m] if m >= 0 else m for m in matched.tolist()])


@pytest.mark.parametrize("anchor_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("low_quality", [True, False], ids=["low_quality", "thresholds_only"])
def test_crowd_boxes_flagged_among_the_boxes_match_as_split_crowd_image_by_image(anchor_dtype, low_quality, device):
    anchors, boxes, flags = flagged_batch(anchor_dtype)
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=low_quality)
    expected = torch.stack([split_crowd_reference(anchors, b, f, matcher) for b, f in zip(boxes, flags)])
    got = match_anchors_batched(anchors.to(device), [b.to(device) for b in boxes], matcher,
                                iscrowd=[f if f is None else f.to(device) for f in flags])
    assert got.device.type == device and torch.equal(got.cpu(), expected)
    assert (got == -2).any() and (got[3] >= 0).any()  # ignored anchors, and matches beside crowd boxes
    for image, flag in enumerate(flags):  # a crowd box is never matched
        if flag is not None and flag.any():
            assert not torch.isin(got[image].cpu(), flag.bool().nonzero().squeeze(1)).any()


def test_model_matches_flagged_crowd_boxes_alike_in_one_call_image_by_image_or_per_image_matcher(monkeypatch):
    anchors, boxes, flags = flagged_batch()
    backbone = nn.Identity()
    backbone.out_channels = 8
    model = FocalRetinaNet(backbone, 2, head=nn.Identity())
    expected = [split_crowd_reference(anchors, b, f, model.proposal_matcher) for b, f in zip(boxes, flags)]
    num_images = len(boxes)
    assert all(torch.equal(g, e) for g, e in zip(model.match([anchors] * num_images, boxes, iscrowd=flags), expected))
    model.proposal_matcher = PerImageMatcher(0.5, 0.4, True)  # split_crowd per image, then mapped back
    assert all(torch.equal(g, e) for g, e in zip(model.match([anchors] * num_images, boxes, iscrowd=flags), expected))
    monkeypatch.setattr(retinanet, "MATCH_BATCH_ELEMENTS", 1)  # over budget: one image per call
    model.proposal_matcher = Matcher(0.5, 0.4, True)
    assert all(torch.equal(g, e) for g, e in zip(model.match([anchors] * num_images, boxes, iscrowd=flags), expected))


def test_crowd_flags_give_the_losses_of_targets_with_the_crowd_boxes_removed(device):
    """compute_loss keeps crowd boxes in the targets (no host sync); the heads' losses are those of
    split_crowd's targets matched with the crowd boxes apart (the per-image path it replaced)."""
    model = build_retinanet(3, "resnet18", **SMALL).to(device).train()
    images, targets = small_batch()
    targets[0] = {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [64.0, 60.0, 128.0, 128.0],
                                         [70.0, 64.0, 120.0, 110.0]]),
                  "labels": torch.tensor([0, 1, 2]), "iscrowd": torch.tensor([0, 1, 0])}
    targets[1] = {**targets[1], "iscrowd": torch.tensor([0])}
    targets.append({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                    "iscrowd": torch.zeros(0, dtype=torch.long)})
    images.append(images[0].flip(-1))
    images = [image.to(device) for image in images]
    targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
    image_list, resized = model.transform(images, [dict(target) for target in targets])
    features = list(model.backbone(image_list.tensors).values())
    head_outputs = model.head(features)
    anchors = model.anchor_generator(image_list, features)
    got = model.compute_loss(resized, head_outputs, anchors)
    kept, crowd_boxes = zip(*(split_crowd(target) for target in resized))
    matched_idxs = model.match(anchors, [target["boxes"] for target in kept], list(crowd_boxes))
    expected = retinanet.retinanet_head_loss(model.head, list(kept), head_outputs, anchors, matched_idxs,
                                             model.box_coder)
    assert set(got) == {"classification", "bbox_regression"}
    assert all(torch.equal(got[name], expected[name]) for name in got), (got, expected)
    # The crowd box matters: without it some anchors of the first image would be background.
    assert not torch.equal(matched_idxs[0], model.match(anchors, [target["boxes"] for target in kept])[0])


def test_model_matching_in_one_call_image_by_image_or_per_image_matcher_agree(monkeypatch):
    anchors, boxes, crowd = matching_batch()
    backbone = nn.Identity()
    backbone.out_channels = 8
    model = FocalRetinaNet(backbone, 2, head=nn.Identity())
    expected = model.match([anchors] * 4, boxes, crowd)  # one batched call
    model.proposal_matcher = PerImageMatcher(0.5, 0.4, True)
    assert all(torch.equal(g, e) for g, e in zip(model.match([anchors.clone() for _ in range(4)], boxes, crowd),
                                                 expected))
    monkeypatch.setattr(retinanet, "MATCH_BATCH_ELEMENTS", 1)  # over budget: one image per call
    model.proposal_matcher = Matcher(0.5, 0.4, True)
    assert all(torch.equal(g, e) for g, e in zip(model.match([anchors] * 4, boxes, crowd), expected))


def test_image_without_boxes_gives_finite_classification_and_zero_box_loss(device):
    model = build_retinanet(3, "resnet18", **SMALL).to(device).train()
    images, targets = small_batch()
    targets[1] = {"boxes": torch.zeros(0, 4, device=device), "labels": torch.zeros(0, dtype=torch.long, device=device)}
    losses = model([images[1].to(device)], targets[1:])
    assert set(losses) == {"classification", "bbox_regression"}
    assert torch.isfinite(losses["classification"]) and losses["classification"] > 0
    assert losses["bbox_regression"].item() == 0.0


def test_target_label_equal_to_num_classes_raises_value_error():
    model = build_retinanet(3, "resnet18", **SMALL).train()
    images, targets = small_batch()
    targets[0]["labels"] = torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"holds 3, expected labels in \[0, num_classes=3\)"):
        model(images, targets)


# ----------------------------------------------------------------------------------
# Training and conversion.
# ----------------------------------------------------------------------------------
def test_retinanet_resnet18_loss_goes_down_in_8_sgd_steps():
    model = build_retinanet(3, "resnet18", **SMALL).train()
    images, targets = small_batch()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    history = []
    for _ in range(8):
        losses = model(images, targets)
        total = losses["classification"] + losses["bbox_regression"]
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append((losses["classification"].item(), total.item()))
    # From the prior init the classification loss moves slowly at first (it starts near the
    # optimum for the background anchors), so the box loss does most of the early descent.
    assert history[-1][0] < history[0][0]
    assert history[-1][1] < 0.95 * history[0][1]


def torchvision_retinanet(norm_layer=None) -> RetinaNet:
    """A small RetinaNet assembled from torchvision's own parts only."""
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d,
                                   trainable_layers=5, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
    head = RetinaNetHead(256, 9, 4, norm_layer=norm_layer)
    return RetinaNet(backbone, 4, min_size=128, max_size=128, score_thresh=0.005, head=head)


@pytest.mark.parametrize("norm_layer", [None, partial(nn.GroupNorm, 32)], ids=["plain", "groupnorm"])
def test_convert_retinanet_keeps_eval_outputs_identical(norm_layer):
    torchvision_model = torchvision_retinanet(norm_layer).eval()
    images, _ = small_batch()
    with torch.no_grad():
        expected = torchvision_model(images)
        converted = convert_retinanet(torchvision_model)
        got = converted(images)
    assert isinstance(converted, FocalRetinaNet) and not converted.training
    assert isinstance(converted.head.classification_head, FocalClassificationHead)
    assert isinstance(torchvision_model.head.classification_head, torchvision.models.detection.retinanet.
                      RetinaNetClassificationHead)  # the input keeps its own head
    assert len(expected[0]["boxes"]) > 0
    for got_image, expected_image in zip(got, expected):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(got_image[key], expected_image[key], rtol=0, atol=0)


def test_converted_image_normalization_gives_torchvision_training_losses():
    torchvision_model = torchvision_retinanet().train()
    converted = convert_retinanet(torchvision_model, normalization="image")
    images, targets = small_batch()
    expected = torchvision_model(images, targets)
    got = converted(images, targets)  # same weights, and train-mode BN uses batch statistics
    for key in ("classification", "bbox_regression"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_convert_with_wrong_num_classes_raises_value_error():
    with pytest.raises(ValueError, match="num_classes=80 but the model's classification head predicts 4 classes"):
        convert_retinanet(torchvision_retinanet(), num_classes=80)


# ----------------------------------------------------------------------------------
# Builder options.
# ----------------------------------------------------------------------------------
def test_default_anchors_equal_torchvision_retinanet():
    model = build_retinanet(3, "resnet18", **SMALL)
    assert model.anchor_generator.sizes == torchvision_retinanet().anchor_generator.sizes
    assert model.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),) * 5


def test_cached_anchors_give_the_losses_of_torchvision_anchors_for_two_sizes_in_a_row():
    # max_size 192: a 128 x 160 batch keeps its size, so the anchors differ from 128 x 128.
    model = build_retinanet(3, "resnet18", fpn_channels=64, min_size=128, max_size=192).train()
    reference = copy.deepcopy(model)
    reference.anchor_generator = AnchorGenerator(model.anchor_generator.sizes, model.anchor_generator.aspect_ratios)
    reference.proposal_matcher = PerImageMatcher(0.5, 0.4, True)  # box_iou + Matcher, image by image
    images, targets = small_batch()
    for width in (128, 160, 128):
        batch = [torch.nn.functional.pad(image, (0, width - 128)) for image in images]
        got, expected = model(batch, targets), reference(batch, targets)
        for key in ("classification", "bbox_regression"):
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_cached_anchor_generator_gives_one_tensor_per_shape_and_forgets_the_oldest():
    sizes, ratios = ((16,), (32,)), ((0.5, 1.0),) * 2
    cached, stock = CachedAnchorGenerator(sizes, ratios, max_entries=2), AnchorGenerator(sizes, ratios)

    def inputs(side):
        features = [torch.zeros(2, 4, side // stride, side // stride) for stride in (8, 16)]
        return ImageList(torch.zeros(2, 3, side, side), [(side, side)] * 2), features

    first = cached(*inputs(64))
    assert torch.equal(first[0], stock(*inputs(64))[0]) and first[1] is first[0]
    assert cached(*inputs(64))[0] is first[0]  # same shape: no recomputation
    with torch.inference_mode():
        assert cached(*inputs(64))[0] is not first[0]  # inference tensors get their own entry
    assert torch.equal(cached(*inputs(96))[0], stock(*inputs(96))[0])
    assert cached(*inputs(64))[0] is not first[0]  # two newer shapes pushed it out (max_entries=2)
    with pytest.raises(ValueError, match="max_entries must be an integer >= 1, got 0"):
        CachedAnchorGenerator(sizes, ratios, max_entries=0)


def test_anchor_cache_leaves_the_state_dict_keys_unchanged():
    model = build_retinanet(3, "resnet18", **SMALL).train()
    keys = list(model.state_dict())
    model(*small_batch())
    assert list(model.state_dict()) == keys and len(model.anchor_generator._cache) == 1
    stock = build_retinanet(3, "resnet18", **SMALL)
    stock.anchor_generator = AnchorGenerator(model.anchor_generator.sizes, model.anchor_generator.aspect_ratios)
    assert list(stock.state_dict()) == keys
    stock.load_state_dict(model.state_dict(), strict=True)


def test_flat_anchor_sizes_give_one_size_per_level_and_bad_levels_raise():
    model = build_retinanet(3, "resnet18", anchor_sizes=(16, 32, 64, 128, 256), aspect_ratios=(1.0,), **SMALL)
    assert model.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    assert model.head.classification_head.num_anchors == 1
    with pytest.raises(ValueError, match="anchor_sizes must give 5 levels"):
        build_retinanet(3, "resnet18", anchor_sizes=(16, 32, 64), **SMALL)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "mobilenet_v3_large"])
def test_backbones_from_scratch_give_p3_to_p7_with_trainable_batchnorm(name):
    body, out_channels = BACKBONES.get(name)(weights=None, fpn_channels=32)
    features = body(torch.rand(1, 3, 64, 64))
    assert out_channels == 32
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert all(p.requires_grad for p in body.parameters())


def test_p6p7_block_keeps_torchvision_keys_and_outputs_and_runs_in_fp32_under_bf16_autocast():
    body, _ = BACKBONES.get("resnet18")(weights=None, fpn_channels=64)
    block = body.fpn.extra_blocks
    reference = LastLevelP6P7(64, 64)
    assert isinstance(block, LastLevelP6P7Fp32) and isinstance(block, LastLevelP6P7)
    assert list(block.state_dict()) == list(reference.state_dict()) == ["p6.weight", "p6.bias", "p7.weight", "p7.bias"]
    block.load_state_dict(reference.state_dict(), strict=True)
    p5 = torch.randn(2, 64, 2, 2)  # P5 of a 64 px image
    ours, theirs = block([p5], [p5], ["p5"]), reference([p5], [p5], ["p5"])
    assert ours[1] == theirs[1] == ["p5", "p6", "p7"]
    torch.testing.assert_close(ours[0], theirs[0])
    with torch.autocast("cpu", torch.bfloat16):
        maps, _ = block([p5.bfloat16().to(memory_format=torch.channels_last)], [p5], ["p5"])
    assert [tuple(m.shape[-2:]) for m in maps[1:]] == [(1, 1), (1, 1)]
    assert [m.dtype for m in maps[1:]] == [torch.float32, torch.float32]
    torch.testing.assert_close(maps[2], theirs[0][2], rtol=0.05, atol=0.05)  # fp32 convs of the bf16-rounded P5
    maps, _ = block.bfloat16()([p5.bfloat16()], [p5], ["p5"])  # a bf16 model without autocast stays bf16
    assert [m.dtype for m in maps[1:]] == [torch.bfloat16, torch.bfloat16]


@pytest.mark.slow
def test_bf16_autocast_channels_last_64px_retinanet_trains_100_sgd_steps_with_finite_gradients(one_thread):
    # The backbone body is frozen (its bf16 convs are emulated on AVX2 CPUs and would take
    # minutes); the FPN, whose P6 -> P7 conv sees a 1x1 map at 64 px, and both heads train.
    model = build_retinanet(3, "resnet18", fpn_channels=64, min_size=64, max_size=64, trainable_backbone_layers=0,
                            head={"type": "focal", "num_convs": 1}).train().to(memory_format=torch.channels_last)
    extra_dtypes = set()
    model.backbone.fpn.extra_blocks.register_forward_hook(
        lambda module, inputs, output: extra_dtypes.update(m.dtype for m in output[0][-2:]))
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=generator) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[5.0, 7.0, 33.0, 40.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[13.0, 13.0, 53.0, 47.0]]), "labels": torch.tensor([1])}]
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.01, momentum=0.9)
    for step in range(100):
        with torch.autocast("cpu", torch.bfloat16):
            losses = model(images, targets)
        optimizer.zero_grad()
        (losses["classification"] + losses["bbox_regression"]).backward()
        assert all(torch.isfinite(p.grad).all() for p in parameters), f"non-finite gradient at step {step}"
        optimizer.step()
    assert extra_dtypes == {torch.float32}
    assert model.backbone.fpn.extra_blocks.p7.weight.grad.abs().sum() > 0


def test_weights_name_resolves_without_download_and_bad_names_raise():
    assert resolve_backbone_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V1") is \
        torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    with pytest.raises(ValueError, match="weights_backbone='ResNet50_Weights.NOPE' is neither"):
        resolve_backbone_weights("resnet50", "ResNet50_Weights.NOPE")
    with pytest.raises(ValueError, match="does not fit backbone 'resnet50'"):
        resolve_backbone_weights("resnet50", "ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        resolve_backbone_weights("resnet50", "/nonexistent/resnet50.pth")


def test_local_pth_weights_load_into_backbone_body_with_frozen_batchnorm(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter))
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_retinanet(3, "resnet18", weights_backbone=str(path), **SMALL)
    body = model.backbone.body
    torch.testing.assert_close(body.layer3[0].conv1.weight, reference.layer3[0].conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(body.bn1.running_var, reference.bn1.running_var, rtol=0, atol=0)
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    # torchvision's default for pretrained backbones: the top 3 stages train.
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad


def test_head_norm_gn_builds_groupnorm_in_both_heads():
    model = build_retinanet(3, "resnet18", head={"type": "focal", "norm": "gn", "normalization": "ema"}, **SMALL)
    for subhead in (model.head.classification_head, model.head.regression_head):
        assert isinstance(subhead.conv[0][1], nn.GroupNorm)
    assert model.head.classification_head.normalization == "ema"


# ----------------------------------------------------------------------------------
# Registries and custom heads.
# ----------------------------------------------------------------------------------
def test_registry_refuses_duplicates_and_lists_names_on_unknown():
    registry = Registry("things")
    registry.register("a")(int)
    with pytest.raises(ValueError, match="'a' is already registered"):
        registry.register("a")(float)
    with pytest.raises(KeyError, match=r"unknown type 'b'; registered: \['a'\]"):
        registry.get("b")
    with pytest.raises(KeyError, match="'focal'"):
        build_retinanet(3, "resnet18", head={"type": "no_such_head"}, **SMALL)


@HEADS.register("my_head")
class MyHead(nn.Module):
    """A user head: one conv to the logits, trained with detfocal's loss."""

    def __init__(self, in_channels, num_anchors, num_classes, norm_layer=None, *, gamma=2.0):
        super().__init__()
        self.num_classes = num_classes
        self.gamma = gamma
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)

    def forward(self, features):
        batch = features[0].shape[0]
        # (B, A*C, H, W) -> (B, H*W*A, C) per level, then concatenated over levels
        return torch.cat([self.cls_logits(f).permute(0, 2, 3, 1).reshape(batch, -1, self.num_classes)
                          for f in features], dim=1)

    def compute_loss(self, targets, head_outputs, matched_idxs):
        labels = labels_from_matched_idxs(targets, matched_idxs, self.num_classes)
        return focal_head_loss(head_outputs["cls_logits"], labels, gamma=self.gamma)


def test_custom_registered_head_builds_from_config():
    model = build_retinanet(3, "resnet18", head={"type": "my_head", "gamma": 1.5}, **SMALL).train()
    assert isinstance(model.head.classification_head, MyHead) and model.head.classification_head.gamma == 1.5
    losses = model(*small_batch())
    assert torch.isfinite(losses["classification"])
    with pytest.raises(ValueError, match="does not fit head type 'my_head'"):
        build_retinanet(3, "resnet18", head={"type": "my_head", "alpha": 0.5}, **SMALL)


def test_detectors_registry_builds_retinanet_from_config():
    model = DETECTORS.build({"type": "retinanet", "num_classes": 2, "backbone": "resnet18", **SMALL,
                             "score_thresh": 0.1, "crowd_ioa_thresh": 0.7})
    assert isinstance(model, FocalRetinaNet)
    assert model.score_thresh == 0.1 and model.crowd_ioa_thresh == 0.7
