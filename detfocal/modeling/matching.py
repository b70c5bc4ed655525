"""Crowd-aware anchor matching: torchvision's ``Matcher`` rules, plus anchors in crowd boxes ignored.

:func:`match_anchors` (with :func:`split_crowd`) is the per-image reference;
:func:`match_anchors_batched` gives the same result bit for bit for a whole batch, in one
broadcast computation with no host sync. Given the crowd flags (:func:`crowd_flags`) it
keeps the crowd boxes among the boxes, masked, instead of removing them: removing them
makes a tensor whose size depends on the flags, which the host must read from the device.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

from detfocal.utils._compat import Matcher
from detfocal.utils.box_ops import box_area, box_intersection

__all__ = ["PER_BOX_KEYS", "anchor_crowd_ioa", "crowd_flags", "match_anchors", "match_anchors_batched", "split_crowd"]

# Per-box fields that follow the boxes when crowd boxes are removed.
PER_BOX_KEYS = ("boxes", "labels", "iscrowd", "area")


def crowd_flags(target: Mapping[str, Tensor]) -> Tensor | None:
    """The crowd flags of ``target`` as a bool ``[M]`` tensor on its boxes' device, or None without ``iscrowd``.

    Args:
        target: ``boxes [M, 4]`` and optionally int/bool ``iscrowd [M]``.

    Returns:
        ``[M]`` bool, True for a crowd box; None where ``target`` has no ``iscrowd``. No host sync.

    Raises:
        ValueError: ``iscrowd`` not a tensor of shape ``[M]``.
    """
    iscrowd = target.get("iscrowd")
    if iscrowd is None:
        return None
    boxes = target["boxes"]
    if not isinstance(iscrowd, Tensor) or tuple(iscrowd.shape) != (boxes.shape[0],):
        raise ValueError(f"target['iscrowd'] must be a tensor of shape ({boxes.shape[0]},), one flag per box, got "
                         f"{tuple(iscrowd.shape) if isinstance(iscrowd, Tensor) else type(iscrowd).__name__}")
    return iscrowd.to(device=boxes.device, dtype=torch.bool)


def split_crowd(target: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
    """Split ``target`` (``boxes [M, 4]``, ``labels [M]``, optional int/bool ``iscrowd [M]``).

    The per-image reference of the crowd rule, and what :func:`match_anchors` takes. Its
    outputs' sizes depend on the flags, so on a GPU it reads them back (host syncs); the
    training path (:meth:`~detfocal.modeling.retinanet.FocalRetinaNet.compute_loss`) passes
    :func:`crowd_flags` to :func:`match_anchors_batched` instead.

    Returns:
        ``(target without crowd boxes, crowd boxes [K, 4] or None)``; the per-box fields
        ``boxes``, ``labels``, ``iscrowd`` and ``area`` are filtered, other keys kept.

    Raises:
        ValueError: ``iscrowd`` not of shape ``[M]``.
    """
    crowd = crowd_flags(target)
    if crowd is None:
        return dict(target), None
    boxes = target["boxes"]
    # Reading the flags back is free on CPU and spares the copies of an image without crowd
    # boxes (nearly all of them); on a GPU it would be one more host sync than the indexing.
    if crowd.device.type == "cpu" and not bool(crowd.any()):
        return dict(target), boxes[:0]
    kept = dict(target)
    keep = (~crowd).nonzero().squeeze(1)  # one index for every per-box field
    for key in PER_BOX_KEYS:
        value = target.get(key)
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == crowd.shape[0]:
            kept[key] = value.index_select(0, keep.to(value.device))
    return kept, boxes[crowd]


def anchor_crowd_ioa(anchors: Tensor, crowd_boxes: Tensor) -> Tensor:
    """Intersection over the ANCHOR's own area, ``[N, 4]`` anchors x ``[K, 4]`` boxes -> ``[N, K]``."""
    intersection = box_intersection(anchors[:, None], crowd_boxes[None])  # (N, 1, 4), (1, K, 4) -> (N, K)
    area = box_area(anchors).clamp(min=torch.finfo(anchors.dtype).tiny)  # a zero-area anchor has IoA 0
    return intersection / area[:, None]


def match_anchors(anchors: Tensor, boxes: Tensor, proposal_matcher: Callable[[Tensor], Tensor],
                  crowd_boxes: Tensor | None = None, crowd_ioa_thresh: float = 0.5) -> Tensor:
    """torchvision's anchor matching, plus ignoring background anchors that lie in a crowd box.

    Args:
        anchors: ``[N, 4]`` anchors of one image.
        boxes: ``[M, 4]`` non-crowd boxes of that image (M may be 0).
        proposal_matcher: maps an ``[M, N]`` IoU matrix to ``[N]`` matched indices, e.g.
            torchvision's ``Matcher(0.5, 0.4, allow_low_quality_matches=True)``.
        crowd_boxes: ``[K, 4]`` crowd boxes, or None.
        crowd_ioa_thresh: an anchor matched to no box (-1) whose intersection with a crowd
            box covers at least this fraction of the anchor becomes ignored (-2).

    Returns:
        ``[N]`` int64: index into ``boxes``, -1 background or -2 ignored.
    """
    if boxes.numel() == 0:
        matched = torch.full((anchors.shape[0],), Matcher.BELOW_LOW_THRESHOLD, dtype=torch.int64,
                             device=anchors.device)
    else:
        matched = proposal_matcher(box_iou(boxes, anchors))
    if crowd_boxes is not None and crowd_boxes.numel() > 0:
        in_crowd = anchor_crowd_ioa(anchors, crowd_boxes).amax(dim=1) >= crowd_ioa_thresh  # (N, K) -> (N,)
        matched = torch.where((matched == Matcher.BELOW_LOW_THRESHOLD) & in_crowd, Matcher.BETWEEN_THRESHOLDS, matched)
    return matched


def _upcast(boxes: Tensor) -> Tensor:
    return boxes.float() if boxes.dtype in (torch.float16, torch.bfloat16) else boxes


def _pad_boxes(boxes: Sequence[Tensor], like: Tensor) -> tuple[Tensor, Tensor]:
    """B x ``[M_i, 4]`` -> zero-padded ``[B, max M_i, 4]`` and its ``[B, max M_i]`` mask of real boxes."""
    padded = torch.nn.utils.rnn.pad_sequence([b.to(like.device) for b in boxes], batch_first=True)
    real = torch.nn.utils.rnn.pad_sequence([torch.ones(len(b), dtype=torch.bool, device=like.device)
                                            for b in boxes], batch_first=True)
    return padded, real


def _in_crowd(anchors: Tensor, regions: Tensor, mask: Tensor, crowd_ioa_thresh: float) -> Tensor:
    """``[B, N]``: the anchor's intersection with a ``mask``-ed box of ``regions [B, K, 4]`` covers >= the threshold.

    As :func:`anchor_crowd_ioa`: intersection over the anchor's area, in the anchors' own dtype.
    """
    intersection = box_intersection(regions[:, :, None], anchors[:, None])  # -> (B, K, N)
    area = box_area(anchors).clamp(min=torch.finfo(anchors.dtype).tiny)[:, None]  # (1|B, 1, N)
    return ((intersection / area >= crowd_ioa_thresh) & mask[:, :, None]).any(dim=1)  # (B, K, N) -> (B, N)


def match_anchors_batched(anchors: Tensor, boxes: Sequence[Tensor], proposal_matcher: Matcher,
                          crowd_boxes: Sequence[Tensor | None] | None = None,
                          crowd_ioa_thresh: float = 0.5, *, iscrowd: Sequence[Tensor | None] | None = None) -> Tensor:
    """:func:`match_anchors` with torchvision's ``Matcher`` for a whole batch: no loop over images, no host sync.

    The boxes are padded to one ``[B, M, 4]`` tensor and the IoU of every image comes from
    one broadcast ``[B, M, N]`` computation, with torchvision's ``box_iou`` arithmetic and
    ``Matcher``'s rules as ``torch.where`` instead of masked writes, so the result equals
    the per-image matching bit for bit (ties included). Memory is B x max M_i x N per
    temporary: :meth:`FocalRetinaNet.match` bounds it.

    Crowd regions come either apart (``crowd_boxes``, as :func:`split_crowd` gives them) or
    flagged among the boxes (``iscrowd``, as :func:`crowd_flags` gives them). A flagged box
    is masked out of the IoU as the padding is, so it is never matched, and acts as a crowd
    region for the ignore rule; the indices still point into the full ``boxes``. This is
    the training path's form: nothing in it depends on the flags' values on the host.

    Args:
        anchors: ``[N, 4]`` anchors shared by every image, or ``[B, N, 4]``.
        boxes: B tensors ``[M_i, 4]`` (M_i may be 0): the non-crowd boxes, or all of them
            with ``iscrowd``.
        proposal_matcher: a torchvision ``Matcher``; its thresholds and
            ``allow_low_quality_matches`` are applied.
        crowd_boxes: B tensors ``[K_i, 4]`` or None, or None for no crowd boxes.
        crowd_ioa_thresh: as :func:`match_anchors`.
        iscrowd: B bool/int tensors ``[M_i]`` (or None: no crowd box in that image) flagging
            the crowd boxes among ``boxes``, or None.

    Returns:
        ``[B, N]`` int64: index into the image's ``boxes``, -1 background or -2 ignored.
        With ``iscrowd``, equal to :func:`match_anchors` on :func:`split_crowd`'s output
        with its indices mapped back to ``boxes``.

    Raises:
        ValueError: ``iscrowd`` of another length than ``boxes``, or a flag tensor of
            another shape than its image's ``[M_i]``.
    """
    below, between = Matcher.BELOW_LOW_THRESHOLD, Matcher.BETWEEN_THRESHOLDS
    anchors = anchors if anchors.dim() == 3 else anchors[None]  # (N, 4) -> (1, N, 4)
    num_images, num_anchors = len(boxes), anchors.shape[1]
    padded, real = _pad_boxes(boxes, anchors)  # (B, M, 4), (B, M)
    candidate, flagged = real, None
    if iscrowd is not None:
        if len(iscrowd) != num_images:
            raise ValueError(f"iscrowd must have one entry per image ({num_images}), got {len(iscrowd)}")
        flags = []
        for index, (flag, b) in enumerate(zip(iscrowd, boxes)):
            if flag is not None and tuple(flag.shape) != (b.shape[0],):
                raise ValueError(f"iscrowd[{index}] must have shape ({b.shape[0]},), one flag per box, got "
                                 f"{tuple(flag.shape)}")
            flags.append(torch.zeros(b.shape[0], dtype=torch.bool, device=anchors.device) if flag is None
                         else flag.to(device=anchors.device, dtype=torch.bool))
        flagged = torch.nn.utils.rnn.pad_sequence(flags, batch_first=True)  # (B, M), False on the padding
        candidate = real & ~flagged
    if padded.shape[1] == 0:
        matched = torch.full((num_images, num_anchors), below, dtype=torch.int64, device=anchors.device)
    else:
        # box_iou's arithmetic, 16-bit boxes (anchors under autocast) upcast to fp32 as its _upcast does.
        padded_iou, anchors_iou = _upcast(padded), _upcast(anchors)
        intersection = box_intersection(padded_iou[:, :, None], anchors_iou[:, None])  # -> (B, M, N)
        union = box_area(padded_iou)[:, :, None] + box_area(anchors_iou)[:, None] - intersection
        # Padding and crowd rows at -1 (below any IoU) never win a max, so the index is that of a
        # matchable box, and among those the first, as for the image's matchable boxes alone.
        iou = torch.where(candidate[:, :, None], intersection / union, -1.0)
        best_iou, best = iou.max(dim=1)  # (B, M, N) -> (B, N)
        matched = torch.where(best_iou < proposal_matcher.low_threshold, below,
                              torch.where(best_iou < proposal_matcher.high_threshold, between, best))
        if proposal_matcher.allow_low_quality_matches:
            # Each box keeps the anchors of its highest IoU, ties included (Matcher.set_low_quality_matches_).
            highest = iou.amax(dim=2, keepdim=True)  # (B, M, N) -> (B, M, 1)
            update = ((iou == highest) & candidate[:, :, None]).any(dim=1)  # (B, M, N) -> (B, N)
            matched = torch.where(update, best, matched)
    in_crowd = None
    # On the CPU, reading the flags back is free and spares the IoA pass of a batch without crowd boxes.
    if flagged is not None and flagged.shape[1] and not (flagged.device.type == "cpu" and not bool(flagged.any())):
        in_crowd = _in_crowd(anchors, padded, flagged, crowd_ioa_thresh)
    if crowd_boxes is not None and any(c is not None and c.numel() for c in crowd_boxes):
        crowd, crowd_real = _pad_boxes([c if c is not None else anchors.new_zeros(0, 4) for c in crowd_boxes], anchors)
        apart = _in_crowd(anchors, crowd, crowd_real, crowd_ioa_thresh)
        in_crowd = apart if in_crowd is None else in_crowd | apart
    if in_crowd is not None:
        matched = torch.where((matched == below) & in_crowd, between, matched)
    return matched
