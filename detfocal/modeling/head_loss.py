"""The classification loss of a dense detector head: anchor labels and the focal loss's normalisers.

:func:`focal_head_loss` is one batched call of :func:`detfocal.losses.sigmoid_focal_loss` on
``[B, N, C]`` logits and integer anchor labels (no per-image loop, no one-hot, no host
sync), divided by the foreground count as detectron2, mmdet or torchvision do
(``normalization``), with that count all-reduced over the processes of a distributed
step (``reduce``).

Label convention: ``num_classes`` (= C) foreground classes, labels in [0, C) are
positives, C is background and :data:`IGNORE_LABEL` (-1) is ignored. These are anchor
labels; torchvision's ``matched_idxs`` use ``Matcher``'s own codes
(``Matcher.BELOW_LOW_THRESHOLD`` = -1 background, ``Matcher.BETWEEN_THRESHOLDS`` = -2
ignored), which :func:`labels_from_matched_idxs` translates.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from detfocal.losses import checks, sigmoid_focal_loss
from detfocal.utils._compat import Matcher
from detfocal.utils.comm import get_world_size, is_dist_initialized

__all__ = ["EMA_INITIAL_VALUE", "IGNORE_LABEL", "NORMALIZATIONS", "REDUCE_MODES", "ReduceLike", "check_normalization",
           "check_reduce", "focal_head_loss", "foreground_normalizer", "labels_from_matched_idxs",
           "normalize_by_foreground", "reduce_group", "stack_matched_idxs"]

NORMALIZATIONS = ("batch", "image", "ema")
REDUCE_MODES = ("auto", "none")
ReduceLike = Union[str, "dist.ProcessGroup"]
IGNORE_LABEL = -1  # anchor label of an anchor that takes no loss (labels only; not a matched_idxs code)
MATCHED_IDXS_EXPECTED = (f"{Matcher.BETWEEN_THRESHOLDS} (ignored), {Matcher.BELOW_LOW_THRESHOLD} (background) "
                         "or the index of a box of that image")
# detectron2's initial value of the foreground-count EMA (RetinaNet, loss_normalizer = 100), per process.
EMA_INITIAL_VALUE = 100.0


def check_normalization(normalization: str) -> None:
    """``normalization`` is one of :data:`NORMALIZATIONS`."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def check_reduce(reduce: ReduceLike) -> None:
    """``reduce`` is "auto", "none" or a ``torch.distributed`` process group."""
    if isinstance(reduce, str) and reduce in REDUCE_MODES:
        return
    if dist.is_available() and isinstance(reduce, dist.ProcessGroup):
        return
    raise ValueError(f"reduce holds {reduce!r}, expected 'auto', 'none' or a torch.distributed ProcessGroup")


def reduce_group(reduce: ReduceLike) -> dist.ProcessGroup | None:
    """The process group whose positive count normalises the loss, or None for this process alone.

    "auto" all-reduces only where a collective is safe and useful: ``torch.distributed``
    is initialised with more than one process and autograd is recording (a training
    step). A validation loss under ``torch.no_grad()``, possibly on one rank only, stays
    local instead of hanging in a collective the other ranks never join. "none" never
    communicates; a ``ProcessGroup`` all-reduces over that group, whatever the grad mode.
    """
    check_reduce(reduce)
    if isinstance(reduce, str):
        if reduce == "auto" and is_dist_initialized() and get_world_size() > 1 and torch.is_grad_enabled():
            return dist.group.WORLD
        return None
    return reduce


def _count_over(foreground: Tensor, group: dist.ProcessGroup | None) -> tuple[Tensor, int]:
    """The positives of ``foreground`` summed over ``group`` (int64, no gradient), and the group's size."""
    count = foreground.sum().detach()
    if group is None:
        return count, 1
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count, dist.get_world_size(group)


def focal_head_loss(
    cls_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    normalization: str = "batch",
    num_foreground_ema: Tensor | None = None,
    ema_momentum: float = 0.9,
    update_ema: bool = True,
    reduce: ReduceLike = "auto",
) -> Tensor:
    """Sigmoid focal loss of a dense detector's class logits, normalised by the foreground count.

    The normalisers:

    - "batch" (the paper, detectron2 without EMA, mmdet): the loss summed over the batch,
      divided by the number of positive anchors in the batch, clamped to >= 1. When
      ``reduce`` all-reduces the count over W processes, each divides by
      ``max(global count, 1) / W``, so DDP's gradient averaging gives exactly the
      gradient of one process holding the whole global batch (mmdet's ``reduce_mean``).
    - "image" (torchvision): each image's sum divided by max(1, its positives), averaged
      over the images. No communication.
    - "ema" (detectron2): the loss summed over the batch, divided by the momentum average
      ``ema = m * ema + (1 - m) * max(global count, 1) / W`` held in ``num_foreground_ema``.
      It counts positives per process, as detectron2 does on each GPU, so its start
      :data:`EMA_INITIAL_VALUE` (100) is detectron2's at any world size (a global count
      would have to start at 100 W), and a checkpoint means the same at any world size.
      With the count all-reduced, every process holds the same value.

    An empty batch (no images or no anchors) gives 0, with a zero gradient, under every
    normaliser.

    Args:
        cls_logits: float ``[B, N, C]`` logits, N anchors, C = num_classes.
        labels: integer ``[B, N]``: c in [0, C) positive for class c, C background,
            -1 ignored.
        alpha: weight of positives in [0, 1] (negatives get 1 - alpha); None or -1 for none.
        gamma: focusing parameter, a finite real >= 0.
        normalization: "batch", "image" or "ema".
        num_foreground_ema: "ema" only, and required there: a one-element float tensor
            (a module buffer) holding the running count; updated in place when
            ``update_ema``.
        ema_momentum: m in [0, 1) of the "ema" update.
        update_ema: whether this call updates ``num_foreground_ema`` (pass
            ``module.training``, so evaluation leaves it alone).
        reduce: whose positives count ("batch", "ema"; see :func:`reduce_group`):
            "auto" all-reduces over the default group when it has more than one process
            and grad mode is on; "none" counts this process's only, with no communication
            (a loss on some ranks only, a process group without DDP); a ``ProcessGroup``
            all-reduces over that group, whose every process must then make the call.

    Returns:
        The scalar loss, fp32 (fp64 for fp64 logits).

    Raises:
        ValueError: ``cls_logits`` not ``[B, N, C]`` floats, ``labels`` not integers of
            shape ``[B, N]`` or outside [0, C] other than -1, an unknown ``normalization``
            or ``reduce``, a missing or unexpected ``num_foreground_ema``, or the checks
            of :func:`~detfocal.losses.sigmoid_focal_loss` (alpha, gamma).

    Example:
        >>> cls_logits = torch.randn(2, 1000, 3, requires_grad=True)
        >>> labels = torch.full((2, 1000), 3)            # background everywhere ...
        >>> labels[0, :5], labels[1, :2] = 1, -1         # ... five positives, two ignored
        >>> focal_head_loss(cls_logits, labels).backward()
    """
    check_normalization(normalization)
    check_reduce(reduce)
    if not isinstance(cls_logits, Tensor) or cls_logits.dim() != 3 or not cls_logits.is_floating_point():
        raise ValueError(f"cls_logits must be a float tensor [B, N, C], got "
                         f"{getattr(cls_logits, 'dtype', type(cls_logits).__name__)} "
                         f"of shape {tuple(getattr(cls_logits, 'shape', ()))}")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError("labels must be an integer tensor [B, N], got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != cls_logits.shape[:2]:
        raise ValueError(f"labels must have shape cls_logits.shape[:2] = {tuple(cls_logits.shape[:2])}, "
                         f"got {tuple(labels.shape)}")
    if normalization == "ema":
        if not isinstance(num_foreground_ema, Tensor) or num_foreground_ema.numel() != 1 \
                or not num_foreground_ema.is_floating_point():
            raise ValueError("normalization='ema' needs num_foreground_ema, a one-element float tensor (a buffer "
                             f"starting at {EMA_INITIAL_VALUE}), got {num_foreground_ema!r}")
        ema_momentum = checks.check_real(ema_momentum, "ema_momentum", high=1.0, high_open=True)
    elif num_foreground_ema is not None:
        raise ValueError("num_foreground_ema is only used with normalization='ema', "
                         f"got normalization={normalization!r}")

    # Checked here, not only inside the loss, so that an error names this function's argument.
    labels = checks.check_int_labels(labels, cls_logits, IGNORE_LABEL, "labels")
    foreground = checks.foreground_mask(labels, cls_logits.shape[-1])  # (B, N)

    if normalization == "image":
        # torchvision's rule needs one sum per image, so keep the elementwise loss.
        loss = sigmoid_focal_loss(cls_logits, labels, alpha, gamma, "none", ignore_index=IGNORE_LABEL)
        loss_per_image = loss.sum(dim=(1, 2))  # (B, N, C) -> (B,)
        num_foreground_per_image = foreground.sum(dim=1).clamp(min=1).to(loss_per_image.dtype)
        # sum / max(B, 1), not mean(): no images gives 0, not NaN.
        return (loss_per_image / num_foreground_per_image).sum() / max(cls_logits.shape[0], 1)

    # The normaliser is known from the labels before the loss, so the loss divides by it
    # inside its own kernel and a plain backward() makes no pass over the gradient.
    dtype = checks.compute_dtype(cls_logits)
    if normalization == "batch":
        return sigmoid_focal_loss(cls_logits, labels, alpha, gamma, "sum", ignore_index=IGNORE_LABEL,
                                  normalizer=foreground_normalizer(foreground, reduce, dtype))
    assert num_foreground_ema is not None
    num_foreground, world_size = _count_over(foreground, reduce_group(reduce))
    ema = num_foreground_ema.detach()
    if update_ema:
        count = num_foreground.clamp(min=1).to(ema.dtype) / world_size  # per process
        ema = ema * ema_momentum + (1.0 - ema_momentum) * count
    # Clamped as "batch" clamps the global count at 1.
    loss = sigmoid_focal_loss(cls_logits, labels, alpha, gamma, "sum", ignore_index=IGNORE_LABEL,
                              normalizer=ema.reshape(()).clamp(min=1 / world_size))
    if update_ema:  # only once the loss has accepted its inputs: a refused call leaves the buffer alone
        with torch.no_grad():
            num_foreground_ema.copy_(ema)
    return loss


def foreground_normalizer(foreground: Tensor, reduce: ReduceLike = "auto",
                          dtype: torch.dtype = torch.float32) -> Tensor:
    """The "batch" rule's divisor: max(1, positives of the global batch) / world size.

    The count is all-reduced over :func:`reduce_group` ``(reduce)`` without gradient, so
    DDP's averaging of W losses divided by it gives exactly the gradient of one process
    holding the whole global batch.

    Args:
        foreground: bool ``[B, N]`` (or any shape) marking this process's positive anchors.
        reduce: "auto", "none" or a process group, as in :func:`focal_head_loss`.
        dtype: of the result: the loss's compute dtype (fp64 logits keep fp64 exactness).

    Returns:
        A 0-d tensor without gradient.
    """
    num_foreground, world_size = _count_over(foreground, reduce_group(reduce))
    return num_foreground.clamp(min=1).to(dtype) / world_size


def normalize_by_foreground(loss_sum: Tensor, foreground: Tensor, reduce: ReduceLike = "auto") -> Tensor:
    """The "batch" rule applied to a summed loss: ``loss_sum / foreground_normalizer(foreground, reduce)``."""
    return loss_sum / foreground_normalizer(foreground, reduce, loss_sum.dtype)


def stack_matched_idxs(matched_idxs: Sequence[Tensor] | Tensor, num_boxes: Sequence[int],
                       num_anchors: int | None = None) -> Tensor:
    """Check torchvision's per-image ``matched_idxs`` and stack them into one ``[B, N]`` int64 tensor.

    Args:
        matched_idxs: one integer ``[N]`` tensor per image, or a ``[B, N]`` tensor: the
            index of the matched box, ``Matcher.BELOW_LOW_THRESHOLD`` (-1, background) or
            ``Matcher.BETWEEN_THRESHOLDS`` (-2, ignored).
        num_boxes: the number of boxes M_i of each image.
        num_anchors: N where it is known (the logits' anchor count); otherwise the first
            image's.

    Returns:
        ``[B, N]`` int64 on ``matched_idxs``'s device.

    Raises:
        ValueError: a count, shape or dtype mismatch, or an index outside [-2, M_i).
    """
    if len(matched_idxs) != len(num_boxes):
        raise ValueError(f"matched_idxs must have one entry per image ({len(num_boxes)}), got {len(matched_idxs)}")
    if isinstance(matched_idxs, Tensor):
        if matched_idxs.dim() != 2:
            raise ValueError(f"matched_idxs as a tensor must be [B, N], got shape {tuple(matched_idxs.shape)}")
        rows: Sequence[Tensor] = list(matched_idxs)
    else:
        rows = matched_idxs
    if num_anchors is None and len(rows):
        num_anchors = rows[0].shape[0] if isinstance(rows[0], Tensor) and rows[0].dim() else -1
    for index, matched in enumerate(rows):
        if not isinstance(matched, Tensor) or tuple(matched.shape) != (num_anchors,) \
                or matched.dtype not in checks.INT_DTYPES:
            raise ValueError(f"matched_idxs[{index}] must have shape (N,) = ({num_anchors},), one integer per anchor, "
                             f"got {getattr(matched, 'dtype', type(matched).__name__)} of shape "
                             f"{tuple(getattr(matched, 'shape', ()))}")
    if not len(rows):
        return torch.zeros(0, num_anchors or 0, dtype=torch.long)
    matched = torch.stack([row.long() for row in rows])  # B x (N,) -> (B, N)
    # Built on the host and copied without blocking: torch.tensor(..., device="cuda") waits for the stream.
    limits = torch.tensor(list(num_boxes)).to(matched.device, non_blocking=True)
    bad = (matched < Matcher.BETWEEN_THRESHOLDS) | (matched >= limits[:, None])
    checks.check_values(matched, bad, "matched_idxs", MATCHED_IDXS_EXPECTED)
    return matched


def labels_from_matched_idxs(targets: Sequence[Mapping[str, Tensor]], matched_idxs: Sequence[Tensor] | Tensor,
                             num_classes: int, num_anchors: int | None = None) -> Tensor:
    """Turn torchvision's ``matched_idxs`` into the integer anchor labels of :func:`focal_head_loss`.

    A matched index i >= 0 becomes the label of box i of that image,
    ``Matcher.BELOW_LOW_THRESHOLD`` (-1) becomes background (``num_classes``) and
    ``Matcher.BETWEEN_THRESHOLDS`` (-2) becomes :data:`IGNORE_LABEL` (-1). One gather on a
    padded ``[B, max boxes]`` label table does all images at once.

    Args:
        targets: one dict per image with ``labels``, integer ``[M_i]`` in [0, num_classes)
            (and ``boxes`` ``[M_i, 4]``, whose length must agree if present).
        matched_idxs: one integer ``[N]`` tensor per image, or a ``[B, N]`` tensor, with
            values in [-2, M_i).
        num_classes: number of foreground classes.
        num_anchors: N, checked against every image's ``matched_idxs`` where given.

    Returns:
        Labels ``[B, N]`` (int64) on ``matched_idxs``'s device.

    Raises:
        ValueError: a count or shape mismatch, a label outside [0, num_classes) or a
            matched index outside [-2, M_i).
    """
    if len(targets) == 0:
        raise ValueError("targets must hold at least one image, got an empty list")
    labels_per_image = []
    for index, target in enumerate(targets):
        labels = target.get("labels")
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(f"targets[{index}]['labels'] must be an integer tensor [M], got "
                             f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}"
                             f"{' of shape ' + str(tuple(labels.shape)) if isinstance(labels, Tensor) else ''}")
        boxes = target.get("boxes")
        if isinstance(boxes, Tensor) and boxes.shape[0] != labels.shape[0]:
            raise ValueError(f"targets[{index}] has {boxes.shape[0]} boxes but labels of shape {tuple(labels.shape)}")
        labels_per_image.append(labels)
    matched = stack_matched_idxs(matched_idxs, [len(labels) for labels in labels_per_image], num_anchors)
    device = matched.device
    labels_per_image = [labels.to(device=device, dtype=torch.long) for labels in labels_per_image]

    all_labels = torch.cat(labels_per_image)
    checks.check_values(all_labels, (all_labels < 0) | (all_labels >= num_classes), "targets",
                        f"labels in [0, num_classes={num_classes}) (num_classes itself is background and is not a "
                        "box label)")

    # Padded label table: a per-image loop of B small copies; the gather below is batched.
    max_boxes = max(len(labels) for labels in labels_per_image)
    table = torch.full((len(targets), max(max_boxes, 1)), num_classes, dtype=torch.long, device=device)
    for index, labels in enumerate(labels_per_image):
        table[index, : len(labels)] = labels
    gathered = table.gather(1, matched.clamp(min=0))  # (B, max_boxes) x (B, N) -> (B, N)
    unmatched = torch.where(matched == Matcher.BELOW_LOW_THRESHOLD, num_classes, IGNORE_LABEL)
    return torch.where(matched >= 0, gathered, unmatched)
