"""A per-image focal-loss alpha from the images' object counts."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import checks

__all__ = ["alpha_from_object_counts"]


def alpha_from_object_counts(num_objs: Tensor | Sequence[float]) -> Tensor:
    """Per-image alpha, alpha_i = clamp(num_objs_i / mean(num_objs), 0, 1).

    Images with fewer objects than the batch average get a proportionally smaller alpha;
    those at or above it get 1. Note what alpha means in the focal loss: positives are
    weighted by alpha and negatives by 1 - alpha, so an image with at least the mean count
    has its negatives weighted 0. If every count is 0 all alphas are 0 (there are no
    positives to weight).

    Feed it to ``sigmoid_focal_loss`` as a per-row alpha, broadcast over the anchors:
    ``alpha[:, None, None]`` for logits ``[B, A, C]``, ``alpha[:, None]`` for ``[B, C]``
    (a bare length-C 1-d alpha would be read as per class).

    Args:
        num_objs: non-negative object counts per image, 1-d, non-empty.

    Returns:
        Float ``[B]`` alphas in [0, 1] (fp64 for fp64 counts, else fp32), on the counts' device.

    Raises:
        ValueError: counts not 1-d, empty, negative, non-finite or not numeric.

    Example:
        >>> from detfocal.losses import sigmoid_focal_loss
        >>> alpha = alpha_from_object_counts(torch.tensor([1, 3, 8]))   # [0.25, 0.75, 1.0]
        >>> logits, labels = torch.randn(3, 100, 80), torch.full((3, 100), 80)
        >>> loss = sigmoid_focal_loss(logits, labels, alpha=alpha[:, None, None], reduction="sum")
    """
    try:
        counts = torch.as_tensor(num_objs)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"num_objs holds {num_objs!r} ({type(num_objs).__name__}), expected a non-empty 1-d "
                         "sequence or tensor of per-image object counts") from None
    if counts.dtype == torch.bool or counts.is_complex():
        raise ValueError(f"num_objs must hold real counts, got dtype {counts.dtype}")
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError("num_objs must be a non-empty 1-d sequence of per-image counts, got shape "
                         f"{tuple(counts.shape)}")
    counts = counts.to(checks.compute_dtype(counts))
    checks.check_values(counts, ~(torch.isfinite(counts) & (counts >= 0)), "num_objs", "finite counts >= 0")
    # All-zero counts: 0 / tiny = 0 instead of 0 / 0.
    return (counts / counts.mean().clamp(min=torch.finfo(counts.dtype).tiny)).clamp(0.0, 1.0)
