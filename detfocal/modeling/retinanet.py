"""RetinaNet with detfocal's head: the detector, its builder and the converter of torchvision's.

:class:`FocalRetinaNet` is torchvision's ``RetinaNet`` with one method overridden,
``compute_loss``, because the crowd rule needs the anchors, which torchvision's heads
never see. It matches all the images of a batch at once, without host syncs (matching:
:mod:`.matching`). Its anchors come from :class:`~detfocal.modeling.anchors.CachedAnchorGenerator`,
torchvision's generator computing the anchors of each batch shape once (:mod:`.anchors`); its
head is assembled, and its loss computed, in :mod:`.retinanet_head`. Everything else
(transform, backbone, post-processing, state_dict keys) is torchvision's own.

:func:`build_retinanet` builds one from config values, :func:`convert_retinanet` from an
existing torchvision RetinaNet.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead

from .anchors import NUM_LEVELS, CachedAnchorGenerator, build_anchor_generator, default_anchor_sizes
from .backbones import resolve_backbone_weights
from .heads import FocalClassificationHead
from .matching import crowd_flags, match_anchors, match_anchors_batched, split_crowd
from .retinanet_head import HEAD_NORMS, build_retinanet_head, infer_norm_layer, retinanet_head_loss
from detfocal.utils._compat import Matcher
from detfocal.utils.registry import BACKBONES, DETECTORS

# Also importable from here, where they lived before anchors.py and retinanet_head.py.
__all__ = ["HEAD_NORMS", "CachedAnchorGenerator", "FocalRetinaNet", "build_retinanet", "convert_retinanet",
           "default_anchor_sizes", "infer_norm_layer", "resolve_backbone_weights", "retinanet_head_loss"]

# Most IoU entries (images x boxes x anchors) matched in one batched call, ~16 MB per fp32
# temporary: the demo's batch (8 x 6 x 1023) fits many times over; a COCO image (120k
# anchors) is matched on its own, as torchvision does, where the loop costs nothing.
MATCH_BATCH_ELEMENTS = 2 ** 22


class FocalRetinaNet(RetinaNet):
    """torchvision's RetinaNet whose matching knows about crowd boxes.

    Targets may carry ``iscrowd`` next to ``boxes`` and ``labels``. Crowd boxes are never
    positives nor regression targets, and anchors that no real box matched but that lie
    mostly inside a crowd box (IoA >= ``crowd_ioa_thresh``) are ignored rather than trained
    as background. Without ``iscrowd`` the matching is exactly torchvision's, computed for
    the whole batch at once (:meth:`match`).

    Args:
        backbone: module returning FPN features, with an ``out_channels`` attribute.
        num_classes: foreground classes; labels lie in [0, num_classes).
        crowd_ioa_thresh: see above, in (0, 1].
        **kwargs: ``RetinaNet``'s arguments. Without ``head``: torchvision's
            ``RetinaNetHead`` holding a :class:`~detfocal.modeling.heads.FocalClassificationHead`;
            without ``anchor_generator``: a :class:`CachedAnchorGenerator` of torchvision's anchors.

    Raises:
        ValueError: ``crowd_ioa_thresh`` out of range, or a head predicting another
            number of classes.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, crowd_ioa_thresh: float = 0.5, **kwargs: Any) -> None:
        if not 0.0 < crowd_ioa_thresh <= 1.0:
            raise ValueError(f"crowd_ioa_thresh must be in (0, 1], got {crowd_ioa_thresh}")
        if kwargs.get("head") is None:
            if kwargs.get("anchor_generator") is None:
                kwargs["anchor_generator"] = CachedAnchorGenerator(default_anchor_sizes(),
                                                                   ((0.5, 1.0, 2.0),) * NUM_LEVELS)
            num_anchors = kwargs["anchor_generator"].num_anchors_per_location()[0]
            kwargs["head"] = build_retinanet_head(backbone.out_channels, num_anchors, num_classes, {"type": "focal"})
        head_classes = getattr(getattr(kwargs["head"], "classification_head", None), "num_classes", num_classes)
        if head_classes != num_classes:
            raise ValueError(f"num_classes={num_classes} but the classification head predicts {head_classes} classes")
        super().__init__(backbone, num_classes, **kwargs)
        self.num_classes = num_classes
        self.crowd_ioa_thresh = float(crowd_ioa_thresh)

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor],
                     anchors: list[Tensor]) -> dict[str, Tensor]:
        """Match anchors (crowd-aware) and return ``{"classification", "bbox_regression"}``.

        The heads see the targets as given, crowd boxes included (their labels must be
        valid class indices too), and ``matched_idxs`` index into them; a crowd box is never
        matched, so it is neither a positive nor a regression target. Removing the crowd
        boxes instead would make tensors whose sizes the host must read from the device.

        Host syncs: none in this method and the focal head's loss; torchvision's
        ``RetinaNetRegressionHead.compute_loss`` makes its own (one ``torch.where`` per image),
        as do, before this method, torchvision's transform and its degenerate-box check
        (see ``docs/how-to/gpu-check.md``).
        """
        iscrowd = [crowd_flags(targets_per_image) for targets_per_image in targets]
        matched_idxs = self.match(anchors, [targets_per_image["boxes"] for targets_per_image in targets],
                                  iscrowd=iscrowd)
        # Heads that need box quality (QFL, VFL) also get the IoU targets of box_quality_targets.
        return retinanet_head_loss(self.head, targets, head_outputs, anchors, matched_idxs, self.box_coder)

    def match(self, anchors: list[Tensor], boxes: list[Tensor], crowd_boxes: list[Tensor | None] | None = None, *,
              iscrowd: list[Tensor | None] | None = None) -> list[Tensor]:
        """The crowd-aware ``matched_idxs`` of every image (see :func:`match_anchors`).

        With torchvision's ``Matcher`` the batch is matched in one call of
        :func:`match_anchors_batched`, or image by image where its ``[B, M, N]`` IoU would
        pass ``MATCH_BATCH_ELEMENTS``, without host syncs; any other ``proposal_matcher`` is
        called image by image through :func:`match_anchors` (with :func:`split_crowd`'s
        host syncs for ``iscrowd``). All give the same result.

        Args:
            anchors: one ``[N, 4]`` tensor per image (one shared tensor from
                :class:`CachedAnchorGenerator`).
            boxes: one ``[M_i, 4]`` tensor per image: its non-crowd boxes, or all of them
                with ``iscrowd``.
            crowd_boxes: one ``[K_i, 4]`` tensor of crowd boxes, or None, per image; or None.
            iscrowd: one bool ``[M_i]`` tensor (or None) per image flagging the crowd boxes
                among ``boxes`` (:func:`crowd_flags`), or None.

        Returns:
            One ``[N]`` int64 tensor per image: index into its ``boxes``, -1 background or
            -2 ignored.
        """
        if not boxes:
            return []
        crowd_boxes = list(crowd_boxes) if crowd_boxes is not None else [None] * len(boxes)
        flags = list(iscrowd) if iscrowd is not None else [None] * len(boxes)
        if type(self.proposal_matcher) is not Matcher:  # noqa: E721 (a subclass may change the rules)
            return [self._match_one_image(a, b, c, f) for a, b, c, f in zip(anchors, boxes, crowd_boxes, flags)]
        most_boxes = max([b.shape[0] for b in boxes] + [c.shape[0] for c in crowd_boxes if c is not None] + [1])
        if all(a.shape == anchors[0].shape for a in anchors) \
                and len(boxes) * most_boxes * anchors[0].shape[0] <= MATCH_BATCH_ELEMENTS:
            # CachedAnchorGenerator gives every image the same tensor: broadcast it rather than stack copies.
            shared = anchors[0] if all(a is anchors[0] for a in anchors) else torch.stack(anchors)
            matched = match_anchors_batched(shared, boxes, self.proposal_matcher, crowd_boxes, self.crowd_ioa_thresh,
                                            iscrowd=flags)
            return list(matched.unbind(0))
        return [match_anchors_batched(a, [b], self.proposal_matcher, [c], self.crowd_ioa_thresh, iscrowd=[f])[0]
                for a, b, c, f in zip(anchors, boxes, crowd_boxes, flags)]

    def _match_one_image(self, anchors: Tensor, boxes: Tensor, crowd_boxes: Tensor | None,
                         iscrowd: Tensor | None) -> Tensor:
        """:func:`match_anchors` with any ``proposal_matcher``; flagged crowd boxes are split off (host syncs)."""
        if iscrowd is None:
            return match_anchors(anchors, boxes, self.proposal_matcher, crowd_boxes, self.crowd_ioa_thresh)
        kept, flagged = split_crowd({"boxes": boxes, "iscrowd": iscrowd})
        regions = [r for r in (crowd_boxes, flagged) if r is not None and r.numel()]
        matched = match_anchors(anchors, kept["boxes"], self.proposal_matcher,
                                torch.cat(regions) if regions else None, self.crowd_ioa_thresh)
        kept_index = (~iscrowd.to(device=boxes.device, dtype=torch.bool)).nonzero().squeeze(1)
        if kept_index.numel() == 0:  # crowd boxes only: nothing was matched
            return matched
        # Indices into the kept boxes -> indices into all of the image's boxes.
        return torch.where(matched >= 0, kept_index.to(matched.device)[matched.clamp(min=0)], matched)


@DETECTORS.register("retinanet")
def build_retinanet(
    num_classes: int,
    backbone: str = "resnet50",
    *,
    weights_backbone: str | os.PathLike | WeightsEnum | None = None,
    trainable_backbone_layers: int | None = None,
    fpn_channels: int = 256,
    anchor_sizes: Sequence[int | Sequence[int]] | None = None,
    aspect_ratios: Sequence[float] | Sequence[Sequence[float]] = (0.5, 1.0, 2.0),
    min_size: int = 800,
    max_size: int = 1333,
    head: Mapping[str, Any] | None = None,
    **detector_kwargs: Any,
) -> FocalRetinaNet:
    """Build a RetinaNet (backbone -> FPN P3-P7 -> focal head) for ``num_classes`` classes.

    With ``backbone="resnet50"`` and ``fpn_channels=256`` the state_dict keys are those of
    torchvision's ``retinanet_resnet50_fpn``.

    Args:
        num_classes: foreground classes; labels lie in [0, num_classes).
        backbone: a name in ``BACKBONES``: "resnet18", "resnet34", "resnet50",
            "resnet101", "mobilenet_v3_large", or one you registered.
        weights_backbone: "ResNet50_Weights.IMAGENET1K_V1"-style name (downloaded by
            torchvision), a local ``.pth`` state dict of the classification network, or
            None to train from scratch (then BatchNorm is trainable ``nn.BatchNorm2d``;
            pretrained backbones use ``FrozenBatchNorm2d``, as torchvision).
        trainable_backbone_layers: stages left trainable, counted from the top (ResNet:
            0-5, default 3 pretrained and 5 from scratch).
        fpn_channels: channels of the FPN and the heads.
        anchor_sizes: 5 levels (P3-P7), each a tuple of sizes or one size.
            Default: torchvision's (32, 40, 50), (64, 80, 101), ... (512, 645, 812).
        aspect_ratios: height/width ratios, the same at every level (or 5 tuples).
        min_size: shorter image side after resizing.
        max_size: cap on the longer side.
        head: classification head config, ``{"type": "focal", "alpha": 0.25, "gamma": 2.0,
            "normalization": "batch", "num_convs": 4, "norm": "none"|"gn"|"bn"}``;
            ``type`` names an entry of ``HEADS``, which is called with the other keys plus
            ``in_channels``, ``num_anchors``, ``num_classes`` and ``norm_layer``. ``norm``
            also applies to the regression head.
        **detector_kwargs: to :class:`FocalRetinaNet` / ``RetinaNet``: score_thresh,
            nms_thresh, detections_per_img, fg_iou_thresh, bg_iou_thresh,
            topk_candidates, crowd_ioa_thresh, image_mean, image_std, ...

    Returns:
        The :class:`FocalRetinaNet`.

    Raises:
        KeyError: an unknown backbone or head type (the message lists the registered ones).
        ValueError: bad num_classes, anchors, head config or weights name.
        FileNotFoundError: ``weights_backbone`` names a missing file.

    Example:
        >>> model = build_retinanet(3, "resnet18", fpn_channels=64, min_size=128, max_size=128,
        ...                         head={"type": "focal", "gamma": 2.0, "norm": "gn"})
        >>> images = [torch.rand(3, 128, 128)]
        >>> targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([1])}]
        >>> losses = model(images, targets)  # {"classification": ..., "bbox_regression": ...}
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1 (foreground classes), got {num_classes!r}")
    if not isinstance(fpn_channels, int) or fpn_channels < 1:
        raise ValueError(f"fpn_channels must be a positive integer, got {fpn_channels!r}")
    body, out_channels = BACKBONES.get(backbone)(weights=weights_backbone, trainable_layers=trainable_backbone_layers,
                                                 fpn_channels=fpn_channels)
    anchor_generator = build_anchor_generator(anchor_sizes, aspect_ratios)
    num_anchors = anchor_generator.num_anchors_per_location()[0]
    retinanet_head = build_retinanet_head(out_channels, num_anchors, num_classes, head or {"type": "focal"})
    return FocalRetinaNet(body, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchor_generator,
                          head=retinanet_head, **detector_kwargs)


def convert_retinanet(model: RetinaNet, *, num_classes: int | None = None, crowd_ioa_thresh: float = 0.5,
                      **head_kwargs: Any) -> FocalRetinaNet:
    """Give an existing torchvision RetinaNet the focal head and the crowd-aware matching.

    Why a new object rather than swapping ``__class__`` or mutating ``model``: a new
    :class:`FocalRetinaNet` built through its public constructor from the input's own
    modules is an ordinary instance of the subclass, and the input keeps working as it
    was. The two share the backbone, matcher, regression head, transform and box coder
    (no copies; ``copy.deepcopy`` the input first if they must train apart). A stock
    ``AnchorGenerator`` is replaced by a :class:`CachedAnchorGenerator` of the same sizes
    and ratios (the same anchors, computed once per batch shape); any other is shared.
    The new :class:`~detfocal.modeling.heads.FocalClassificationHead` is loaded with the
    input's classification weights, so outputs are identical.

    Args:
        model: a torchvision ``RetinaNet`` whose head has ``classification_head`` and
            ``regression_head`` (e.g. ``retinanet_resnet50_fpn(weights=...)``).
        num_classes: optional check: the class count you expect the model to predict.
        crowd_ioa_thresh: see :class:`FocalRetinaNet`.
        **head_kwargs: to :class:`~detfocal.modeling.heads.FocalClassificationHead` (alpha, gamma,
            normalization, ema_momentum, norm_layer if it cannot be inferred).

    Returns:
        The :class:`FocalRetinaNet`, in the input's train/eval mode.

    Raises:
        ValueError: not a RetinaNet, ``num_classes`` differing from the model's, or
            classification weights that do not fit the focal head.

    Example:
        >>> from torchvision.models.detection import retinanet_resnet50_fpn
        >>> tv_model = retinanet_resnet50_fpn(weights=None, weights_backbone=None)
        >>> model = convert_retinanet(tv_model, normalization="batch")
    """
    if not isinstance(model, RetinaNet):
        raise ValueError(f"model must be a torchvision RetinaNet, got {type(model).__name__}")
    old = getattr(model.head, "classification_head", None)
    if not isinstance(getattr(old, "cls_logits", None), nn.Conv2d) or not isinstance(getattr(old, "conv", None),
                                                                                   nn.Sequential):
        raise ValueError("model.head.classification_head must be RetinaNet's classification head (conv, cls_logits)")
    num_anchors = model.anchor_generator.num_anchors_per_location()[0]
    in_channels = old.cls_logits.in_channels
    model_classes = old.cls_logits.out_channels // num_anchors
    if num_classes is not None and num_classes != model_classes:
        raise ValueError(f"num_classes={num_classes} but the model's classification head predicts {model_classes} "
                         f"classes ({old.cls_logits.out_channels} outputs / {num_anchors} anchors)")
    if "norm_layer" not in head_kwargs:
        head_kwargs["norm_layer"] = infer_norm_layer(old.conv[0]) if len(old.conv) else None
    weight = old.cls_logits.weight
    focal = FocalClassificationHead(in_channels, num_anchors, model_classes, num_convs=len(old.conv), **head_kwargs)
    focal.to(device=weight.device, dtype=weight.dtype)
    result = focal.load_state_dict(old.state_dict(), strict=False)
    missing = [key for key in result.missing_keys if key != "num_foreground_ema"]
    if missing or result.unexpected_keys:
        raise ValueError(f"the model's classification weights do not fit FocalClassificationHead: missing {missing}, "
                         f"unexpected {result.unexpected_keys}")
    norm_layer = head_kwargs["norm_layer"]
    head = RetinaNetHead(in_channels, num_anchors, model_classes, norm_layer=norm_layer)
    head.classification_head = focal
    head.regression_head = model.head.regression_head
    anchor_generator = model.anchor_generator
    if type(anchor_generator) is AnchorGenerator:  # noqa: E721 (a subclass may place anchors otherwise)
        anchor_generator = CachedAnchorGenerator(anchor_generator.sizes, anchor_generator.aspect_ratios)
    converted = FocalRetinaNet(model.backbone, model_classes, crowd_ioa_thresh=crowd_ioa_thresh,
                               anchor_generator=anchor_generator, head=head,
                               proposal_matcher=model.proposal_matcher, score_thresh=model.score_thresh,
                               nms_thresh=model.nms_thresh, detections_per_img=model.detections_per_img,
                               topk_candidates=model.topk_candidates)
    # Shared as they are, so preprocessing options the constructor does not take carry over too.
    converted.transform = model.transform
    converted.box_coder = model.box_coder
    return converted.train(model.training)
