"""The focal-loss classification head of RetinaNet.

:class:`FocalClassificationHead` is a drop-in for torchvision's
``RetinaNetClassificationHead``: the same ``forward`` and ``compute_loss`` signatures, the
same anchor order and, with four convs, the same state_dict keys. What changes is the
loss: :func:`~detfocal.modeling.head_loss.focal_head_loss`, one batched call on ``[B, N, C]``
integer labels with a choice of normaliser. The loss side (labels from ``matched_idxs``,
normalisers, their distributed semantics) lives in :mod:`detfocal.modeling.head_loss`; its
names are importable from here too.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from detfocal.losses import checks
from detfocal.utils.registry import HEADS

from .head_loss import (EMA_INITIAL_VALUE, IGNORE_LABEL, NORMALIZATIONS, REDUCE_MODES, ReduceLike,
                        check_normalization, check_reduce, focal_head_loss, foreground_normalizer,
                        labels_from_matched_idxs, normalize_by_foreground, reduce_group, stack_matched_idxs)

__all__ = ["EMA_INITIAL_VALUE", "IGNORE_LABEL", "NORMALIZATIONS", "REDUCE_MODES", "FocalClassificationHead",
           "check_reduce", "focal_head_loss", "foreground_normalizer", "labels_from_matched_idxs",
           "normalize_by_foreground", "reduce_group", "stack_matched_idxs"]


@HEADS.register("focal")
class FocalClassificationHead(nn.Module):
    """RetinaNet's classification subnet trained with the sigmoid focal loss.

    A drop-in for ``torchvision.models.detection.retinanet.RetinaNetClassificationHead``:
    ``num_convs`` 3x3 conv(+norm)+ReLU layers, then a 3x3 conv to ``num_anchors *
    num_classes`` logits, with the same module names (``conv.*``, ``cls_logits.*``) and
    initialisation, so with ``num_convs=4`` and the same ``norm_layer`` state dicts move
    between the two with ``strict=True``. The only extra state is the buffer
    ``num_foreground_ema``, present only when ``normalization="ema"``.

    Args:
        in_channels: channels of every FPN level.
        num_anchors: anchors per location (A).
        num_classes: foreground classes (C); labels lie in [0, C).
        prior_probability: pi of the paper's initialisation: the logit bias is
            -log((1 - pi) / pi), so every anchor starts at foreground probability pi.
        norm_layer: normalisation after each conv (e.g. ``partial(nn.GroupNorm, 32)``);
            None for none, as torchvision's default.
        num_convs: depth of the conv tower (the paper uses 4).
        alpha: focal loss alpha in [0, 1], or None / -1 for no weighting.
        gamma: focal loss gamma, a finite real >= 0.
        normalization: "batch", "image" or "ema"; see :func:`focal_head_loss`.
        ema_momentum: momentum of the "ema" normaliser.
        reduce: whose positives normalise the loss: "auto" (all-reduced over the default
            process group during a distributed training step), "none" (this process's
            only), or a ``ProcessGroup``; see :func:`focal_head_loss`. Not saved in the
            state dict.

    Raises:
        ValueError: a non-positive size, a prior outside (0, 1), alpha or gamma out of
            range, or an unknown normalization or reduce.

    Example:
        >>> from torchvision.models.detection import retinanet_resnet50_fpn
        >>> model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
        >>> model.head.classification_head = FocalClassificationHead(256, 9, 3)
        >>> # model now trains with the focal head's batched loss; see also convert_retinanet.
    """

    # The state_dict layout of torchvision's head (its version 2: conv.{i}.0.weight).
    _version = 2

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        prior_probability: float = 0.01,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        num_convs: int = 4,
        alpha: float | None = 0.25,
        gamma: float = 2.0,
        normalization: str = "batch",
        ema_momentum: float = 0.9,
        reduce: ReduceLike = "auto",
    ) -> None:
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("num_anchors", num_anchors, 1),
                                 ("num_classes", num_classes, 1), ("num_convs", num_convs, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        prior_probability = checks.check_real(prior_probability, "prior_probability", high=1.0, low_open=True,
                                              high_open=True)
        checks.check_alpha(alpha)
        gamma = checks.check_gamma(gamma)
        check_normalization(normalization)
        ema_momentum = checks.check_real(ema_momentum, "ema_momentum", high=1.0, high_open=True)
        check_reduce(reduce)

        self.conv = nn.Sequential(*[Conv2dNormActivation(in_channels, in_channels, norm_layer=norm_layer)
                                    for _ in range(num_convs)])
        for layer in self.conv.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, kernel_size=3, stride=1, padding=1)
        nn.init.normal_(self.cls_logits.weight, std=0.01)
        # Lin et al. 2017, section 4.1 "Initialization": without this prior, the ~100k
        # background anchors swamp the first iterations and training diverges.
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))

        self.in_channels = in_channels
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        self.alpha = alpha
        self.gamma = gamma
        self.normalization = normalization
        self.ema_momentum = ema_momentum
        self.reduce = reduce
        self.num_foreground_ema: Tensor | None
        if normalization == "ema":
            self.register_buffer("num_foreground_ema", torch.tensor(EMA_INITIAL_VALUE))
        else:
            self.num_foreground_ema = None

    def forward(self, x: list[Tensor]) -> Tensor:
        """Class logits of every anchor, in torchvision's order (level, y, x, anchor).

        Args:
            x: FPN feature maps, level by level, each ``[B, in_channels, H_l, W_l]``.

        Returns:
            Logits ``[B, N, num_classes]`` with N = sum over levels of H_l * W_l * A.
        """
        all_cls_logits = []
        for features in x:
            cls_logits = self.cls_logits(self.conv(features))
            batch, _, height, width = cls_logits.shape
            # (B, A*C, H, W) -> (B, A, C, H, W)
            cls_logits = cls_logits.view(batch, -1, self.num_classes, height, width)
            cls_logits = cls_logits.permute(0, 3, 4, 1, 2)  # (B, A, C, H, W) -> (B, H, W, A, C)
            cls_logits = cls_logits.reshape(batch, -1, self.num_classes)  # (B, H, W, A, C) -> (B, H*W*A, C)
            all_cls_logits.append(cls_logits)
        return torch.cat(all_cls_logits, dim=1)  # L x (B, N_l, C) -> (B, N, C)

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor],
                     matched_idxs: list[Tensor]) -> Tensor:
        """The classification loss, with torchvision's signature.

        Args:
            targets: one dict per image with ``labels`` int ``[M_i]`` in [0, num_classes)
                (crowd boxes already removed: see :class:`detfocal.modeling.retinanet.FocalRetinaNet`).
            head_outputs: ``{"cls_logits": [B, N, num_classes], ...}``.
            matched_idxs: per image ``[N]``: the index of the matched box, -1 for
                background or -2 for ignored (torchvision's ``Matcher`` codes).

        Returns:
            The scalar loss, normalised as ``self.normalization`` says.

        Raises:
            ValueError: logits with a class count other than ``num_classes``,
                ``matched_idxs`` of the wrong number or length, or labels out of range.
        """
        cls_logits = head_outputs["cls_logits"]
        labels = self.labels_for_loss(targets, cls_logits, matched_idxs)
        return focal_head_loss(cls_logits, labels, alpha=self.alpha, gamma=self.gamma,
                               normalization=self.normalization, num_foreground_ema=self.num_foreground_ema,
                               ema_momentum=self.ema_momentum, update_ema=self.training, reduce=self.reduce)

    def labels_for_loss(self, targets: list[dict[str, Tensor]], cls_logits: Tensor,
                        matched_idxs: list[Tensor]) -> Tensor:
        """Check the logits against this head and ``matched_idxs``, then build the ``[B, N]`` labels."""
        if cls_logits.dim() != 3 or cls_logits.shape[-1] != self.num_classes:
            raise ValueError(f"head_outputs['cls_logits'] must be [B, N, num_classes={self.num_classes}], got shape "
                             f"{tuple(cls_logits.shape)}: the head and the model disagree on num_classes")
        num_images, num_anchors = cls_logits.shape[:2]
        if len(targets) != num_images:
            raise ValueError(f"targets must have one entry per image ({num_images}), got {len(targets)}")
        return labels_from_matched_idxs(targets, matched_idxs, self.num_classes, num_anchors)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_anchors={self.num_anchors}, alpha={self.alpha}, "
                f"gamma={self.gamma}, normalization={self.normalization!r}")
