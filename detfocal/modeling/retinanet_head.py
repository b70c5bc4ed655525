"""torchvision's ``RetinaNetHead`` with a registered classification head: built from config, and its loss.

The regression subnet stays torchvision's; the classification subnet comes from ``HEADS``
(:func:`build_retinanet_head`). :func:`retinanet_head_loss` is the head's
``compute_loss``, plus the IoU targets a quality head (QFL, VFL) needs.
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable, Mapping

from torch import Tensor, nn
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FrozenBatchNorm2d

from .quality_heads import box_quality_targets
from detfocal.utils._compat import BoxCoder
from detfocal.utils.registry import HEADS

__all__ = ["HEAD_NORMS", "build_retinanet_head", "infer_norm_layer", "retinanet_head_loss"]

# The head's "norm" option; GroupNorm(32) as torchvision's RetinaNet v2 and detectron2.
HEAD_NORMS: dict[str, Callable[..., nn.Module] | None] = {"none": None, "gn": partial(nn.GroupNorm, 32),
                                                          "bn": nn.BatchNorm2d}


def _norm_layer(norm: str, channels: int) -> Callable[..., nn.Module] | None:
    if norm not in HEAD_NORMS:
        raise ValueError(f"head 'norm' must be one of {sorted(HEAD_NORMS)}, got {norm!r}")
    if norm == "gn" and channels % 32:
        raise ValueError(f"head norm 'gn' uses 32 groups and needs fpn_channels divisible by 32, got {channels}")
    return HEAD_NORMS[norm]


def build_retinanet_head(in_channels: int, num_anchors: int, num_classes: int,
                         head: Mapping[str, Any]) -> RetinaNetHead:
    """torchvision's RetinaNetHead with the classification head built from ``head`` via ``HEADS``.

    Args:
        in_channels: channels of the FPN levels.
        num_anchors: anchors per location.
        num_classes: foreground classes; labels lie in [0, num_classes).
        head: the classification head config, as ``build_retinanet``'s ``head``: ``type``
            names an entry of ``HEADS``; ``norm`` ("none", "gn" or "bn", see
            :data:`HEAD_NORMS`) also applies to the regression head.

    Returns:
        The ``RetinaNetHead``, its ``classification_head`` replaced.

    Raises:
        KeyError: an unknown head type (the message lists the registered ones).
        ValueError: an unknown ``norm``, "gn" with ``in_channels`` not divisible by 32, or a
            config that sets what this function passes or does not fit the head's signature.
    """
    cfg = dict(head)
    cfg.setdefault("type", "focal")
    norm_layer = _norm_layer(cfg.pop("norm", "none"), in_channels)
    given = {"in_channels": in_channels, "num_anchors": num_anchors, "num_classes": num_classes,
             "norm_layer": norm_layer}
    clash = sorted(set(given) & set(cfg))
    if clash:
        raise ValueError(f"head config must not set {clash}: build_retinanet passes them "
                         "(use 'norm' to choose the norm layer)")
    factory = HEADS.get(cfg["type"])
    try:
        inspect.signature(factory).bind(**{k: v for k, v in cfg.items() if k != "type"}, **given)
    except TypeError as exc:
        raise ValueError(f"head config {dict(head)!r} does not fit head type {cfg['type']!r}: {exc}") from None
    retinanet_head = RetinaNetHead(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
    # RetinaNetHead's public slot for the classification subnet; the regression one stays torchvision's.
    retinanet_head.classification_head = HEADS.build(cfg, **given)
    return retinanet_head


def infer_norm_layer(block: nn.Module) -> Callable[..., nn.Module] | None:
    """The norm_layer that rebuilds ``block`` (a torchvision Conv2dNormActivation)."""
    norms = [m for m in block.children() if not isinstance(m, (nn.Conv2d, nn.ReLU))]
    if not norms:
        return None
    norm = norms[0]
    if isinstance(norm, nn.GroupNorm):
        return partial(nn.GroupNorm, norm.num_groups, eps=norm.eps)
    if isinstance(norm, nn.BatchNorm2d):
        return partial(nn.BatchNorm2d, eps=norm.eps, momentum=norm.momentum)
    if isinstance(norm, FrozenBatchNorm2d):
        return partial(FrozenBatchNorm2d, eps=norm.eps)
    raise ValueError(f"cannot infer norm_layer from the head's {type(norm).__name__}; pass norm_layer=...")


def retinanet_head_loss(
    head: RetinaNetHead,
    targets: list[dict[str, Tensor]],
    head_outputs: dict[str, Tensor],
    anchors: list[Tensor],
    matched_idxs: list[Tensor],
    box_coder: BoxCoder,
) -> dict[str, Tensor]:
    """``head.compute_loss``, plus the IoU targets for a classification head that needs them.

    A classification head with ``needs_box_quality = True`` (the QFL and VFL heads of
    :mod:`detfocal.modeling.quality_heads`) gets ``quality=box_quality_targets(...)``; any
    other head goes through torchvision's ``RetinaNetHead.compute_loss`` unchanged. Call
    it from a detector's ``compute_loss`` after matching, where anchors, box deltas and
    matched boxes are all at hand.

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
        ValueError: as :func:`~detfocal.modeling.quality_heads.box_quality_targets` and the
            heads' ``compute_loss``.
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
