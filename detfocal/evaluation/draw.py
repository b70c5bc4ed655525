"""Drawing detections (and ground truth) on an image, for ``detfocal infer`` and a run's sample images."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["MAX_DRAW_SIZE", "PALETTE", "draw_detections"]

# Tableau's 10 colours: one per class (cycled), so a class keeps its colour across images.
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]
MAX_DRAW_SIZE = 4096  # px: a larger min_draw_size would only allocate huge images


def draw_detections(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, names: Sequence[str], *,
                    scores: torch.Tensor | None = None, gt_boxes: torch.Tensor | None = None,
                    min_draw_size: int = 0) -> torch.Tensor:
    """Draw boxes with class names (and scores) on an image; ground truth, if given, in white.

    Args:
        image: float ``[3, H, W]`` in [0, 1].
        boxes: ``[K, 4]`` (x1, y1, x2, y2) detections.
        labels: ``[K]`` their labels.
        names: class name per label (a label beyond it is drawn as its number).
        scores: ``[K]``, shown next to the names.
        gt_boxes: ``[G, 4]`` ground-truth boxes.
        min_draw_size: enlarge a smaller image by a whole factor until its longer side reaches
            this many pixels (the label font is a fixed ~11 px, which would cover a 128 px image);
            pixel repetition keeps the pixels crisp and the boxes exact.

    Returns:
        uint8 ``[3, H', W']``.

    Raises:
        ValueError: ``min_draw_size`` is outside [0, MAX_DRAW_SIZE].

    Example:
        >>> drawn = draw_detections(image, detections["boxes"], detections["labels"], ["cat", "dog"])
    """
    from torchvision.utils import draw_bounding_boxes

    from detfocal.data import to_uint8

    if not 0 <= min_draw_size <= MAX_DRAW_SIZE:
        raise ValueError(f"min_draw_size: expected pixels in [0, {MAX_DRAW_SIZE}], got {min_draw_size}")
    drawn = to_uint8(image)
    factor = max(1, -(-min_draw_size // max(drawn.shape[1:])))  # ceil division
    if factor > 1:
        drawn = drawn.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    if gt_boxes is not None and len(gt_boxes):
        drawn = draw_bounding_boxes(drawn, gt_boxes.float() * factor, colors="white", width=1)
    if len(boxes):
        label_list = labels.tolist()
        texts = [names[label] if label < len(names) else str(label) for label in label_list]
        if scores is not None:
            texts = [f"{text} {score:.2f}" for text, score in zip(texts, scores.tolist())]
        drawn = draw_bounding_boxes(drawn, boxes.float() * factor, labels=texts, width=2,
                                    colors=[PALETTE[label % len(PALETTE)] for label in label_list])
    return drawn
