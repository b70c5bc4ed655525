"""IoU-aware classification heads for RetinaNet: GFL's QFL ("qfl") and VarifocalNet's VFL ("vfl").

Both heads train the score of an anchor's class towards the IoU of its predicted box with
the box it matched, instead of towards 1, so the score that NMS ranks by also says how good
the box is. The heads are :class:`~detfocal.modeling.heads.FocalClassificationHead` with another
loss: the same convs, ``forward``, state_dict keys and initialisation.

Why a ``quality`` argument: a classification head never sees the anchors nor the box
predictions, so it cannot compute the IoU itself. The detector computes it with
:func:`box_quality_targets` and passes it to ``compute_loss(..., quality=...)``;
:func:`detfocal.modeling.retinanet_head.retinanet_head_loss` does exactly that for heads that
declare ``needs_box_quality = True``, and plain ``RetinaNetHead.compute_loss`` for the others.

Label convention, as in :mod:`detfocal.modeling.head_loss`: ``num_classes`` (= C) foreground classes,
labels in [0, C), C is background and -1 is ignored.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from detfocal.losses import checks, quality_focal_loss, varifocal_loss
from detfocal.utils._compat import BoxCoder
from detfocal.utils.box_ops import aligned_box_iou
from detfocal.utils.registry import HEADS

from .head_loss import IGNORE_LABEL, ReduceLike, normalize_by_foreground, stack_matched_idxs
from .heads import FocalClassificationHead

__all__ = ["QualityFocalClassificationHead", "VarifocalClassificationHead", "box_quality_targets"]


# --------------------------------------------------------------------------------------
# IoU targets.
# --------------------------------------------------------------------------------------
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
    for name, given in (("anchors", anchors), ("targets", targets)):
        if len(given) != num_images:
            raise ValueError(f"{name} must have one entry per image ({num_images}), got {len(given)}")
    for index, anchors_per_image in enumerate(anchors):
        if tuple(anchors_per_image.shape) != (num_anchors, 4):
            raise ValueError(f"anchors[{index}] must have shape ({num_anchors}, 4), got "
                             f"{tuple(anchors_per_image.shape)}")
    boxes_per_image = []
    for index, target in enumerate(targets):
        boxes = target.get("boxes")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{index}]['boxes'] must be a tensor [M, 4], got "
                             f"{tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__}")
        boxes_per_image.append(boxes)

    dtype = checks.compute_dtype(bbox_regression)
    device = bbox_regression.device
    matched = stack_matched_idxs(matched_idxs, [len(boxes) for boxes in boxes_per_image], num_anchors)
    matched = matched.to(device)  # (B, N)
    with torch.no_grad():
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
        iou = aligned_box_iou(predicted, matched_boxes)  # (B, N)
        return torch.where(matched >= 0, iou, torch.zeros_like(iou))


# --------------------------------------------------------------------------------------
# The heads.
# --------------------------------------------------------------------------------------
class _BoxQualityHead(FocalClassificationHead, ABC):
    """The shared part of the QFL and VFL heads: input checks and the "batch" normaliser."""

    # Read by retinanet_head_loss: this head's compute_loss needs quality=box_quality_targets(...).
    needs_box_quality = True

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor],
                     matched_idxs: list[Tensor], quality: Tensor | None = None) -> Tensor:
        """The classification loss, with torchvision's signature plus the IoU targets.

        Normalised as :func:`~detfocal.modeling.head_loss.focal_head_loss` with "batch" (GFL's and
        VarifocalNet's ``avg_factor``): the batch sum divided by max(1, positive anchors),
        the count all-reduced as ``self.reduce`` says.

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
                :func:`~detfocal.modeling.retinanet_head.retinanet_head_loss`), ``quality`` not ``[B, N]`` floats or
                outside [0, 1], or the checks of ``FocalClassificationHead.compute_loss``.
        """
        cls_logits = head_outputs["cls_logits"]
        labels = self.labels_for_loss(targets, cls_logits, matched_idxs)
        if quality is None:
            raise ValueError(f"{type(self).__name__}.compute_loss needs quality=, the [B, N] IoU targets of "
                             "box_quality_targets; the detector must pass them (detfocal.modeling.retinanet."
                             "retinanet_head_loss does; torchvision's RetinaNetHead.compute_loss does not)")
        if not isinstance(quality, Tensor) or not quality.is_floating_point() \
                or quality.shape != cls_logits.shape[:2]:
            raise ValueError(f"quality must be a float tensor of shape [B, N] = {tuple(cls_logits.shape[:2])}, got "
                             f"{getattr(quality, 'dtype', type(quality).__name__)} of shape "
                             f"{tuple(getattr(quality, 'shape', ()))}")
        quality = quality.detach()
        checks.check_unit_interval(quality, "quality")

        foreground = checks.foreground_mask(labels, self.num_classes)  # (B, N)
        loss_sum = self._loss_sum(cls_logits, labels, foreground, quality)
        return normalize_by_foreground(loss_sum, foreground, self.reduce)

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
        in_channels, num_anchors, num_classes, prior_probability, norm_layer, num_convs, reduce:
            as :class:`~detfocal.modeling.heads.FocalClassificationHead`.
        beta: the focusing exponent, a finite real >= 0 (GFL uses 2).

    Raises:
        ValueError: a bad beta, or the checks of ``FocalClassificationHead``.

    Example:
        >>> from detfocal.modeling.retinanet import build_retinanet
        >>> model = build_retinanet(3, "resnet18", fpn_channels=64, min_size=128, max_size=128,
        ...                         head={"type": "qfl", "beta": 2.0})
        >>> # training needs a detector that passes quality=, see retinanet_head.retinanet_head_loss.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, prior_probability: float = 0.01,
                 norm_layer: Callable[..., nn.Module] | None = None, *, num_convs: int = 4, beta: float = 2.0,
                 reduce: ReduceLike = "auto") -> None:
        beta = checks.check_gamma(beta, "beta")
        super().__init__(in_channels, num_anchors, num_classes, prior_probability, norm_layer, num_convs=num_convs,
                         alpha=None, gamma=beta, normalization="batch", reduce=reduce)
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
        in_channels, num_anchors, num_classes, prior_probability, norm_layer, num_convs, reduce:
            as :class:`~detfocal.modeling.heads.FocalClassificationHead`.
        alpha: weight of the negatives, a finite real >= 0 (VarifocalNet uses 0.75).
        gamma: focusing exponent of the negatives, a finite real >= 0 (VarifocalNet uses 2).
        iou_weighted: weight positives by q (True, the paper) or by 1.

    Raises:
        ValueError: a bad alpha, gamma or iou_weighted, or the checks of
            ``FocalClassificationHead``.

    Example:
        >>> head = VarifocalClassificationHead(64, 9, 3, alpha=0.75, gamma=2.0)
        >>> logits = head([torch.randn(2, 64, 8, 8)])  # (2, 8*8*9, 3)
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, prior_probability: float = 0.01,
                 norm_layer: Callable[..., nn.Module] | None = None, *, num_convs: int = 4, alpha: float = 0.75,
                 gamma: float = 2.0, iou_weighted: bool = True, reduce: ReduceLike = "auto") -> None:
        alpha = checks.check_real(alpha, "alpha")
        if not isinstance(iou_weighted, bool):
            raise ValueError(f"iou_weighted must be a bool, got {iou_weighted!r}")
        super().__init__(in_channels, num_anchors, num_classes, prior_probability, norm_layer, num_convs=num_convs,
                         alpha=None, gamma=gamma, normalization="batch", reduce=reduce)
        # VFL's alpha weights the negatives and may exceed 1, unlike the focal head's alpha.
        self.alpha = alpha
        self.iou_weighted = iou_weighted

    def _loss_sum(self, cls_logits: Tensor, labels: Tensor, foreground: Tensor, quality: Tensor) -> Tensor:
        dtype = checks.compute_dtype(cls_logits)
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
