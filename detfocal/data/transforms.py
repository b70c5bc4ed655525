"""Detection augmentation with torchvision transforms v2: boxes follow the image."""
from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2


def labels_and_iscrowd(inputs: Any) -> tuple[torch.Tensor, ...]:
    """``labels_getter`` for SanitizeBoundingBoxes: every per-box tensor that must stay aligned.

    A module-level function rather than a lambda so that DataLoader workers can pickle it.

    Args:
        inputs: ``(image, target)`` or ``target``, where target is a dict.

    Returns:
        The target's "labels" and "iscrowd" tensors, those that are present.
    """
    target = inputs[1] if isinstance(inputs, (tuple, list)) else inputs
    return tuple(target[key] for key in ("labels", "iscrowd") if key in target)


def build_transforms(
    train: bool,
    hflip: float = 0.5,
    scale_jitter: tuple[float, float] | None = None,
    photometric: bool = False,
) -> v2.Compose:
    """Build the ``(image, target) -> (image, target)`` pipeline for ``CocoDetection``.

    Resizing to the model's min/max size is left to torchvision's GeneralizedRCNNTransform.
    For the same reason scale jitter zooms the content inside a canvas of unchanged size
    (``RandomAffine(scale=...)``): a plain resize of the whole image would be undone there.

    Args:
        train: add the random augmentations; False only converts to float.
        hflip: probability of a horizontal flip, in [0, 1].
        scale_jitter: ``(low, high)`` zoom factors, e.g. ``(0.8, 1.2)``; None disables it.
        photometric: add SSD-style photometric distortion (brightness, contrast, saturation,
            hue, channel order).

    Returns:
        A ``v2.Compose`` taking a PIL image or ``tv_tensors.Image`` and a target dict whose
        "boxes" is a ``tv_tensors.BoundingBoxes``. It returns a float32 image in [0, 1]. In
        training, boxes that leave the image or become smaller than 1 px are removed together
        with their "labels" and "iscrowd" entries.

    Raises:
        ValueError: ``hflip`` is outside [0, 1] or ``scale_jitter`` is not ``0 < low <= high``.

    Example:
        >>> dataset = CocoDetection(images, annotations, transforms=build_transforms(train=True))
    """
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"hflip: expected a probability in [0, 1], got {hflip!r}")
    if scale_jitter is not None:
        if len(scale_jitter) != 2 or not 0 < scale_jitter[0] <= scale_jitter[1]:
            raise ValueError(f"scale_jitter: expected (low, high) with 0 < low <= high, got {scale_jitter!r}")

    steps: list[Any] = [v2.ToImage()]
    if train:
        if photometric:
            steps.append(v2.RandomPhotometricDistort())
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(p=hflip))
        if scale_jitter is not None:
            steps.append(v2.RandomAffine(degrees=0.0, scale=tuple(scale_jitter)))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if train:
        steps.append(v2.ClampBoundingBoxes())
        steps.append(v2.SanitizeBoundingBoxes(labels_getter=labels_and_iscrowd))
    return v2.Compose(steps)
