"""IoU-aware classification heads for RetinaNet: GFL's QFL ("qfl") and VarifocalNet's VFL ("vfl").

Both heads train the score of an anchor's class towards the IoU of its predicted box with
the box it matched, instead of towards 1, so the score that NMS ranks by also says how good
the box is. The heads are :class:`~detfocal.modeling.heads.FocalClassificationHead` with another
loss: the same convs, ``forward``, state_dict keys and initialisation.

Why a ``quality`` argument: a classification head never sees the anchors nor the box
predictions, so it cannot compute the IoU itself. The detector computes it with
:func:`box_quality_targets` and passes it to ``compute_loss(..., quality=...)``;
:func:`retinanet_head_loss` does exactly that for heads that declare
``needs_box_quality = True``, and plain ``RetinaNetHead.compute_loss`` for the others.

Label convention, as in :mod:`detfocal.modeling.heads`: ``num_classes`` (= C) foreground classes,
labels in [0, C), C is background and -1 is ignored.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.retinanet import RetinaNetHead

from .heads import IGNORE_LABEL, MATCHED_IDXS_EXPECTED, FocalClassificationHead, normalize_by_foreground
from detfocal.losses import quality_focal_loss, varifocal_loss
from detfocal.losses.checks import check_unit_interval, check_values
from detfocal.registry import HEADS

__all__ = ["QualityFocalClassificationHead", "VarifocalClassificationHead", "box_quality_targets",
           "retinanet_head_loss"]


# --------------------------------------------------------------------------------------
# IoU targets.
# --------------------------------------------------------------------------------------
def _aligned_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of ``boxes1[..., i]`` with ``boxes2[..., i]`` (x1, y1, x2, y2): ``[..., 4]`` x ``[..., 4]`` -> ``[...]``.

    The diagonal of ``torchvision.ops.box_iou`` without its ``[K, K]`` matrix.
    """
    top_left = torch.max(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    size = (bottom_right - top_left).clamp(min=0)
    intersection = size[..., 0] * size[..., 1]
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    union = (area1 + area2 - intersection).clamp(min=torch.finfo(boxes1.dtype).tiny)  # two empty boxes: IoU 0
    # intersection <= union exactly, but rounding may land a hair above 1; the heads demand [0, 1].
    return (intersection / union).clamp(0.0, 1.0)


def box_quality_targets(
    anchors: Sequence[Tensor],
    bbox_regression: Tensor,
    targets: Sequence[Mapping[str, Tensor]],
    matched_idxs: Sequence[Tensor],
    box_coder: BoxCoder,
) -> Tensor:
    """The IoU target of every anchor: its decoded box against its matched box, detached.

    GFL (Li et al. 2020, section 3.1) and VarifocalNet (Zhang et al. 2021, section 3.1)
    both take the IoU between a positive's predicted box and its ground-truth box as the
    classification target, with no gradient into the box branch. Every anchor of the batch
    is decoded at once (a few ``[B, N, 4]`` ops, no per-image boolean indexing, no host
    sync) and non-positives are set to 0.

    Args:
        anchors: one ``[N, 4]`` tensor per image (x1, y1, x2, y2, image coordinates).
        bbox_regression: ``[B, N, 4]`` box deltas, ``head_outputs["bbox_regression"]``.
        targets: one dict per image with ``boxes`` ``[M_i, 4]`` (crowd boxes removed, as
            the heads see them).
        matched_idxs: one integer ``[N]`` tensor per image: the matched box index, -1
            background or -2 ignored.
        box_coder: the detector's ``BoxCoder`` (RetinaNet's has weights (1, 1, 1, 1)).

    Returns:
        ``[B, N]`` IoUs in [0, 1] at positive anchors, 0 elsewhere; fp32 (fp64 for fp64
        ``bbox_regression``), no gradient.

    Raises:
        ValueError: ``bbox_regression`` not ``[B, N, 4]`` floats, a count or shape
            mismatch among anchors, targets and matched_idxs, or a matched index outside
            [-2, M_i).

    Example:
        >>> from torchvision.models.detection._utils import BoxCoder
        >>> anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])]
        >>> targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 20.0]])}]
        >>> box_quality_targets(anchors, torch.zeros(1, 2, 4), targets, [torch.tensor([0, -1])],
        ...                     BoxCoder((1.0, 1.0, 1.0, 1.0)))
        tensor([[0.5000, 0.0000]])
    """
    if not isinstance(bbox_regression, Tensor) or bbox_regression.dim() != 3 or bbox_regression.shape[-1] != 4 \
            or not bbox_regression.is_floating_point():
        raise ValueError("bbox_regression must be a float tensor [B, N, 4], got "
                         f"{getattr(bbox_regression, 'dtype', type(bbox_regression).__name__)} of shape "
                         f"{tuple(getattr(bbox_regression, 'shape', ()))}")
    num_images, num_anchors = bbox_regression.shape[:2]
    for name, given in (("anchors", anchors), ("targets", targets), ("matched_idxs", matched_idxs)):
        if len(given) != num_images:
            raise ValueError(f"{name} must have one entry per image ({num_images}), got {len(given)}")
    for index, (anchors_per_image, matched) in enumerate(zip(anchors, matched_idxs)):
        if tuple(anchors_per_image.shape) != (num_anchors, 4):
            raise ValueError(f"anchors[{index}] must have shape ({num_anchors}, 4), got "
                             f"{tuple(anchors_per_image.shape)}")
        if tuple(matched.shape) != (num_anchors,) or matched.is_floating_point() or matched.dtype == torch.bool:
            raise ValueError(f"matched_idxs[{index}] must be an integer tensor of shape ({num_anchors},), got "
                             f"{matched.dtype} of shape {tuple(matched.shape)}")
    boxes_per_image = []
    for index, target in enumerate(targets):
        boxes = target.get("boxes")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{index}]['boxes'] must be a tensor [M, 4], got "
                             f"{tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__}")
        boxes_per_image.append(boxes)

    dtype = torch.float64 if bbox_regression.dtype == torch.float64 else torch.float32
    device = bbox_regression.device
    with torch.no_grad():
        matched = torch.stack(list(matched_idxs)).to(device=device, dtype=torch.long)  # B x (N,) -> (B, N)
        num_boxes = torch.tensor([len(boxes) for boxes in boxes_per_image], device=device)
        bad = (matched < -2) | (matched >= num_boxes[:, None])
        check_values(matched, bad, "matched_idxs", MATCHED_IDXS_EXPECTED)

        codes = bbox_regression.detach().to(dtype)
        anchors_all = torch.stack(list(anchors)).to(device=device, dtype=dtype)  # B x (N, 4) -> (B, N, 4)
        # decode_single takes [K, 4] deltas and boxes: (B, N, 4) -> (B*N, 4) -> (B, N, 4)
        predicted = box_coder.decode_single(codes.reshape(-1, 4), anchors_all.reshape(-1, 4))
        predicted = predicted.reshape(num_images, num_anchors, 4)

        # Padded [B, max boxes, 4] table so one gather finds every anchor's matched box.
        max_boxes = max(max(len(boxes) for boxes in boxes_per_image), 1)
        table = torch.zeros(num_images, max_boxes, 4, dtype=dtype, device=device)
        for index, boxes in enumerate(boxes_per_image):
            table[index, : len(boxes)] = boxes.to(device=device, dtype=dtype)
        gather_index = matched.clamp(min=0)[..., None].expand(-1, -1, 4)  # (B, N) -> (B, N, 4)
        matched_boxes = table.gather(1, gather_index)  # (B, max_boxes, 4) -> (B, N, 4)
        iou = _aligned_box_iou(predicted, matched_boxes)  # (B, N)
        return torch.where(matched >= 0, iou, torch.zeros_like(iou))


# --------------------------------------------------------------------------------------
# The heads.
# --------------------------------------------------------------------------------------
def _check_nonnegative(value: float, name: str) -> float:
    value = float(value)
    if not (value >= 0.0 and math.isfinite(value)):  # also rejects NaN
        raise ValueError(f"{name} must be a finite real number >= 0, got {value}")
    return value


class _BoxQualityHead(FocalClassificationHead, ABC):
    """The shared part of the QFL and VFL heads: input checks and the "batch" normaliser."""

    # Read by retinanet_head_loss: this head's compute_loss needs quality=box_quality_targets(...).
    needs_box_quality = True

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor],
                     matched_idxs: list[Tensor], quality: Tensor | None = None) -> Tensor:
        """The classification loss, with torchvision's signature plus the IoU targets.

        Normalised as :func:`~detfocal.modeling.heads.focal_head_loss` with "batch" (GFL's and
        VarifocalNet's ``avg_factor``): the batch sum divided by max(1, positive anchors),
        the count all-reduced under ``torch.distributed``.

        Args:
            targets: one dict per image with ``labels`` int ``[M_i]`` in [0, num_classes).
            head_outputs: ``{"cls_logits": [B, N, num_classes], ...}``.
            matched_idxs: per image ``[N]``: matched box index, -1 background, -2 ignored.
            quality: float ``[B, N]`` IoU targets in [0, 1], read at positive anchors:
                :func:`box_quality_targets`. Required; it is detached here.

        Returns:
            The scalar loss, fp32 (fp64 for fp64 logits).

        Raises:
            ValueError: a missing ``quality`` (the detector did not pass it: use
                :func:`retinanet_head_loss`), ``quality`` not ``[B, N]`` floats or outside
                [0, 1], or the checks of ``FocalClassificationHead.compute_loss``.
        """
        cls_logits = head_outputs["cls_logits"]
        labels = self.labels_for_loss(targets, cls_logits, matched_idxs)
        if quality is None:
            raise ValueError(f"{type(self).__name__}.compute_loss needs quality=, the [B, N] IoU targets of "
                             "box_quality_targets; the detector must pass them (detfocal.modeling.quality_heads.retinanet_head_loss "
                             "does; torchvision's RetinaNetHead.compute_loss does not)")
        if not isinstance(quality, Tensor) or not quality.is_floating_point() \
                or quality.shape != cls_logits.shape[:2]:
            raise ValueError(f"quality must be a float tensor of shape [B, N] = {tuple(cls_logits.shape[:2])}, got "
                             f"{getattr(quality, 'dtype', type(quality).__name__)} of shape "
                             f"{tuple(getattr(quality, 'shape', ()))}")
        quality = quality.detach()
        check_unit_interval(quality, "quality")

        foreground = (labels >= 0) & (labels < self.num_classes)  # (B, N)
        return normalize_by_foreground(self._loss_sum(cls_logits, labels, foreground, quality), foreground)

    @abstractmethod
    def _loss_sum(self, cls_logits: Tensor, labels: Tensor, foreground: Tensor, quality: Tensor) -> Tensor:
        """The summed loss of the batch; ``compute_loss`` divides it by the foreground count.

        Shapes: ``cls_logits`` (B, N, C); ``labels`` (B, N) in [0, C] or -1 (ignored);
        ``foreground`` (B, N) bool; ``quality`` (B, N) IoU targets in [0, 1].
        """


@HEADS.register("qfl")
class QualityFocalClassificationHead(_BoxQualityHead):
    """RetinaNet's classification subnet trained with GFL's quality focal loss.

    QFL = -|y - p|^beta ((1 - y) log(1 - p) + y log p) (Li et al. 2020, eq. 5), with y the
    IoU target at the anchor's class and 0 at every other class and at background anchors;
    see :func:`detfocal.losses.quality_focal_loss`. With every IoU equal to 1 this is the
    focal loss with alpha = -1 and gamma = beta. Same modules and state_dict keys as
    :class:`~detfocal.modeling.heads.FocalClassificationHead` (``self.gamma`` holds beta, ``self.alpha``
    is None).

    Args:
        in_channels, num_anchors, num_classes, prior_probability, norm_layer, num_convs:
            as :class:`~detfocal.modeling.heads.FocalClassificationHead`.
        beta: the focusing exponent, >= 0 (GFL uses 2).

    Raises:
        ValueError: a bad beta, or the checks of ``FocalClassificationHead``.

    Example:
        >>> from detfocal.modeling.retinanet import build_retinanet
        >>> model = build_retinanet(3, "resnet18", fpn_channels=64, min_size=128, max_size=128,
        ...                         head={"type": "qfl", "beta": 2.0})
        >>> # training needs a detector that passes quality=, see retinanet_head_loss.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        prior_probability: float = 0.01,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        num_convs: int = 4,
        beta: float = 2.0,
    ) -> None:
        beta = _check_nonnegative(beta, "beta")
        super().__init__(in_channels, num_anchors, num_classes, prior_probability, norm_layer, num_convs=num_convs,
                         alpha=None, gamma=beta, normalization="batch")
        self.beta = beta

    def _loss_sum(self, cls_logits: Tensor, labels: Tensor, foreground: Tensor, quality: Tensor) -> Tensor:
        return quality_focal_loss(cls_logits, labels, quality, beta=self.beta, reduction="sum",
                                  ignore_index=IGNORE_LABEL)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_anchors={self.num_anchors}, beta={self.beta}"


@HEADS.register("vfl")
class VarifocalClassificationHead(_BoxQualityHead):
    """RetinaNet's classification subnet trained with VarifocalNet's varifocal loss.

    VFL(p, q) = -q (q log p + (1 - q) log(1 - p)) where q > 0 and -alpha p^gamma log(1 - p)
    where q = 0 (Zhang et al. 2021, eq. 2); q is the IoU target at the anchor's class and 0
    elsewhere, so a positive whose predicted box misses its box entirely (IoU 0) is trained
    as a negative, as in VarifocalNet. See :func:`detfocal.losses.varifocal_loss`. Ignored
    anchors take no loss. Same modules and state_dict keys as
    :class:`~detfocal.modeling.heads.FocalClassificationHead`.

    Args:
        in_channels, num_anchors, num_classes, prior_probability, norm_layer, num_convs:
            as :class:`~detfocal.modeling.heads.FocalClassificationHead`.
        alpha: weight >= 0 of the negatives (VarifocalNet uses 0.75).
        gamma: focusing exponent >= 0 of the negatives (VarifocalNet uses 2).
        iou_weighted: weight positives by q (True, the paper) or by 1.

    Raises:
        ValueError: a bad alpha, gamma or iou_weighted, or the checks of
            ``FocalClassificationHead``.

    Example:
        >>> head = VarifocalClassificationHead(64, 9, 3, alpha=0.75, gamma=2.0)
        >>> logits = head([torch.randn(2, 64, 8, 8)])  # (2, 8*8*9, 3)
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        prior_probability: float = 0.01,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        num_convs: int = 4,
        alpha: float = 0.75,
        gamma: float = 2.0,
        iou_weighted: bool = True,
    ) -> None:
        alpha = _check_nonnegative(alpha, "alpha")
        gamma = _check_nonnegative(gamma, "gamma")
        if not isinstance(iou_weighted, bool):
            raise ValueError(f"iou_weighted must be a bool, got {iou_weighted!r}")
        super().__init__(in_channels, num_anchors, num_classes, prior_probability, norm_layer, num_convs=num_convs,
                         alpha=None, gamma=gamma, normalization="batch")
        # VFL's alpha weights the negatives and may exceed 1, unlike the focal head's alpha.
        self.alpha = alpha
        self.iou_weighted = iou_weighted

    def _loss_sum(self, cls_logits: Tensor, labels: Tensor, foreground: Tensor, quality: Tensor) -> Tensor:
        dtype = torch.float64 if cls_logits.dtype == torch.float64 else torch.float32
        # Dense [B, N, C] targets: q at the positive's class column, 0 everywhere else.
        index = torch.where(foreground, labels, torch.zeros_like(labels)).unsqueeze(-1)  # (B, N) -> (B, N, 1)
        q = torch.where(foreground, quality.to(dtype), 0).unsqueeze(-1)  # (B, N) -> (B, N, 1)
        dense = torch.zeros(cls_logits.shape, dtype=dtype, device=cls_logits.device).scatter_(-1, index, q)
        loss = varifocal_loss(cls_logits, dense, alpha=self.alpha, gamma=self.gamma, iou_weighted=self.iou_weighted,
                              reduction="none")
        # where, not multiply: an ignored anchor's loss never reaches the sum or the gradient.
        kept = (labels != IGNORE_LABEL).unsqueeze(-1)  # (B, N) -> (B, N, 1)
        return torch.where(kept, loss, torch.zeros_like(loss)).sum()

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_anchors={self.num_anchors}, alpha={self.alpha}, "
                f"gamma={self.gamma}, iou_weighted={self.iou_weighted}")


# --------------------------------------------------------------------------------------
# The detector's side.
# --------------------------------------------------------------------------------------
def retinanet_head_loss(
    head: RetinaNetHead,
    targets: list[dict[str, Tensor]],
    head_outputs: dict[str, Tensor],
    anchors: list[Tensor],
    matched_idxs: list[Tensor],
    box_coder: BoxCoder,
) -> dict[str, Tensor]:
    """``head.compute_loss``, plus the IoU targets for a classification head that needs them.

    A classification head with ``needs_box_quality = True`` gets
    ``quality=box_quality_targets(...)``; any other head goes through torchvision's
    ``RetinaNetHead.compute_loss`` unchanged. Call it from a detector's ``compute_loss``
    after matching, where anchors, box deltas and matched boxes are all at hand.

    Args:
        head: torchvision's ``RetinaNetHead`` (``classification_head``, ``regression_head``),
            or any module with its ``compute_loss``.
        targets: one dict per image with ``boxes`` and ``labels`` (crowd boxes removed).
        head_outputs: ``{"cls_logits": [B, N, C], "bbox_regression": [B, N, 4]}``.
        anchors: one ``[N, 4]`` tensor per image.
        matched_idxs: one ``[N]`` tensor per image (index, -1 background, -2 ignored).
        box_coder: the detector's ``BoxCoder``.

    Returns:
        ``{"classification": ..., "bbox_regression": ...}``, torchvision's loss keys.

    Raises:
        ValueError: as :func:`box_quality_targets` and the heads' ``compute_loss``.
    """
    # getattr twice: any head with torchvision's compute_loss signature, even one without subnets, passes through.
    classification_head = getattr(head, "classification_head", None)
    if not getattr(classification_head, "needs_box_quality", False):
        return head.compute_loss(targets, head_outputs, anchors, matched_idxs)
    quality = box_quality_targets(anchors, head_outputs["bbox_regression"], targets, matched_idxs, box_coder)
    return {
        "classification": classification_head.compute_loss(targets, head_outputs, matched_idxs, quality=quality),
        "bbox_regression": head.regression_head.compute_loss(targets, head_outputs, anchors, matched_idxs),
    }
