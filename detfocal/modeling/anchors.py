"""RetinaNet's anchors: torchvision's generator, cached per batch shape, and its config.

:class:`CachedAnchorGenerator` is torchvision's ``AnchorGenerator`` computing the anchors
of each batch shape once; :func:`build_anchor_generator` makes one from the config's
``anchor_sizes`` and ``aspect_ratios`` (:func:`default_anchor_sizes` when none are given).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

__all__ = ["NUM_LEVELS", "CachedAnchorGenerator", "build_anchor_generator", "default_anchor_sizes"]

NUM_LEVELS = 5  # P3-P7


class CachedAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator``, computing the anchors of each batch shape once.

    Anchors depend only on the padded batch size, the feature map sizes, dtype and device,
    yet torchvision rebuilds them at every forward (~50 small ops). This keeps the last
    ``max_entries`` results in a plain dict (no buffer: the state_dict stays empty, as
    torchvision's) and gives every image of a batch the same ``[N, 4]`` tensor, so callers
    must not modify anchors in place (torchvision's RetinaNet does not). Traced and
    scripted forwards (the ONNX export) compute them as torchvision does, which keeps the
    image size dynamic in the graph. ``sizes`` and ``aspect_ratios`` are read once: build
    a new generator to change them.

    Args:
        sizes, aspect_ratios: as ``AnchorGenerator``.
        max_entries: batch shapes remembered (least recently used dropped first), >= 1.

    Raises:
        ValueError: ``max_entries`` below 1.
    """

    def __init__(self, sizes: Sequence[Sequence[int]], aspect_ratios: Sequence[Sequence[float]],
                 max_entries: int = 8) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an integer >= 1, got {max_entries!r}")
        super().__init__(sizes, aspect_ratios)
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple[Any, ...], Tensor] = OrderedDict()

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        num_images = len(image_list.image_sizes)
        if torch.jit.is_tracing() or torch.jit.is_scripting() or num_images == 0:
            return super().forward(image_list, feature_maps)
        # Inference mode is part of the key: its tensors cannot be saved for a later backward.
        key = (tuple(image_list.tensors.shape[-2:]), tuple(tuple(f.shape[-2:]) for f in feature_maps),
               feature_maps[0].dtype, feature_maps[0].device, torch.is_inference_mode_enabled())
        anchors = self._cache.get(key)
        if anchors is None:
            first = ImageList(image_list.tensors[:1], image_list.image_sizes[:1])  # only shapes matter
            anchors = self._cache[key] = super().forward(first, feature_maps)[0]
            if len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return [anchors] * num_images


def default_anchor_sizes() -> tuple[tuple[int, ...], ...]:
    """torchvision's RetinaNet anchors: 3 octave scales of 32..512 over P3-P7 (paper, section 4)."""
    return tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in (32, 64, 128, 256, 512))


def build_anchor_generator(anchor_sizes: Sequence[int | Sequence[int]] | None,
                           aspect_ratios: Sequence[float] | Sequence[Sequence[float]]) -> CachedAnchorGenerator:
    """The :class:`CachedAnchorGenerator` of ``build_retinanet``'s ``anchor_sizes`` and ``aspect_ratios``.

    Args:
        anchor_sizes: 5 levels (P3-P7), each one size (an int) or a tuple of sizes, the same
            number at every level; None for :func:`default_anchor_sizes`.
        aspect_ratios: height/width ratios, one tuple for every level or 5 tuples of equal length.

    Returns:
        The generator.

    Raises:
        ValueError: not 5 levels, levels of different lengths, or no aspect ratio.
    """
    # Per level: one size (an int) or a tuple of sizes.
    sizes = default_anchor_sizes() if anchor_sizes is None else tuple(
        (int(level),) if isinstance(level, (int, float)) else tuple(int(size) for size in level)
        for level in anchor_sizes)
    if len(sizes) != NUM_LEVELS or len({len(level) for level in sizes}) != 1:
        raise ValueError(f"anchor_sizes must give {NUM_LEVELS} levels (P3-P7) with the same number of sizes each, "
                         f"got {anchor_sizes!r}")
    if all(isinstance(ratio, (int, float)) for ratio in aspect_ratios):
        ratios = (tuple(float(r) for r in aspect_ratios),) * NUM_LEVELS
    else:
        ratios = tuple(tuple(float(r) for r in level) for level in aspect_ratios)
    if len(ratios) != NUM_LEVELS or len({len(level) for level in ratios}) != 1 or not ratios[0]:
        raise ValueError(f"aspect_ratios must be one tuple of ratios, or {NUM_LEVELS} tuples of equal length, "
                         f"got {aspect_ratios!r}")
    return CachedAnchorGenerator(sizes, ratios)
