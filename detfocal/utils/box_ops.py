"""Box arithmetic on (x1, y1, x2, y2) boxes that torchvision.ops does not offer in broadcast form."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["aligned_box_iou", "box_area", "box_intersection"]


def box_area(boxes: Tensor) -> Tensor:
    """Areas of ``[..., 4]`` boxes (x1, y1, x2, y2) -> ``[...]``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_intersection(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection areas of boxes (x1, y1, x2, y2) broadcast against each other: ``[..., 4]`` -> ``[...]``.

    Aligned pairs take two ``[K, 4]``; all pairs take ``boxes1[:, None]`` and ``boxes2[None]``.
    """
    top_left = torch.max(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    size = (bottom_right - top_left).clamp(min=0)
    return size[..., 0] * size[..., 1]


def aligned_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of ``boxes1[..., i]`` with ``boxes2[..., i]`` (x1, y1, x2, y2): ``[..., 4]`` x ``[..., 4]`` -> ``[...]``.

    The diagonal of ``torchvision.ops.box_iou`` without its ``[K, K]`` matrix.
    """
    intersection = box_intersection(boxes1, boxes2)
    # Two empty boxes: IoU 0, not 0 / 0.
    union = (box_area(boxes1) + box_area(boxes2) - intersection).clamp(min=torch.finfo(boxes1.dtype).tiny)
    # intersection <= union exactly, but rounding may land a hair above 1; the heads demand [0, 1].
    return (intersection / union).clamp(0.0, 1.0)
