"""Why the focal loss works, shown on a trained model: every anchor's loss and gradient at several gammas.

:func:`anchor_logits_and_labels` runs a detector over a batch and labels every anchor with
the model's own transform, anchor generator, matcher and crowd rule, the calls
``FocalRetinaNet.compute_loss`` makes, so the labels are those training used (positive,
background, or ignored between the IoU thresholds and inside crowd boxes).
:func:`collect_anchor_losses` then computes, in float64, each anchor's classification loss
(the sigmoid focal loss summed over the classes) for several gammas at the run's alpha,
and the norm of its gradient with respect to the anchor's logits. :func:`summarize` reduces
them to the numbers of ``detfocal analyze``: anchors, positives and ignored anchors per
image, the negative:positive ratio, the share of the loss the negatives carry (all of them,
the easiest 90%, those the model already puts below p = 0.01), and the effective number of
negatives. :mod:`detfocal.evaluation.analysis_plots` draws Lin et al. 2017, Figure 4, and
the gradient-norm histogram of Li et al. 2019 (GHM), Figure 1, and writes the files.

These shares are also the evidence an imbalance study needs: how much of the training
signal at each gamma comes from easy background.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detfocal.evaluation.analysis_stats import (EASY_FRACTION, EASY_PROBABILITY, GAMMAS, GRADIENT_GAMMAS,  # noqa: F401
                                                AnchorLosses, cumulative_loss, hardest_fraction, summarize)
from detfocal.modeling.head_loss import IGNORE_LABEL, labels_from_matched_idxs
from detfocal.modeling.matching import split_crowd

__all__ = ["EASY_FRACTION", "EASY_PROBABILITY", "GAMMAS", "GRADIENT_GAMMAS", "AnchorLosses", "analysis_gammas",
           "analyze_split", "anchor_focal_loss", "anchor_logits_and_labels", "collect_anchor_losses",
           "cumulative_loss", "hardest_fraction", "run_focal_parameters", "summarize"]

logger = logging.getLogger(__name__)

def analysis_gammas(run_gamma: float | None = None) -> tuple[float, ...]:
    """:data:`GAMMAS`, plus the gamma the model was trained with when it is not among them (sorted)."""
    if run_gamma is None or float(run_gamma) in GAMMAS:
        return GAMMAS
    return tuple(sorted((*GAMMAS, float(run_gamma))))


def _check_alpha(alpha: float | None) -> float | None:
    if alpha is None or alpha == -1:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], or None / -1 for no weighting, got {alpha!r}")
    return float(alpha)


def anchor_focal_loss(cls_logits: Tensor, labels: Tensor, *, alpha: float | None, gamma: float,
                      with_gradient: bool = False) -> tuple[Tensor, Tensor | None]:
    """Each anchor's sigmoid focal loss, summed over the classes, in float64; optionally its gradient's norm.

    FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) per class (Lin et al. 2017, eq. 5), with the
    gradient dFL/dx_t = alpha_t (1 - p_t)^gamma (gamma p_t log(p_t) + p_t - 1) (the paper's
    appendix). Written out here rather than through autograd so that an analysis of 10^7
    anchors needs no graph; the tests check both against
    :func:`~detfocal.losses.sigmoid_focal_loss` and its autograd.

    Args:
        cls_logits: float ``[..., N, C]`` logits.
        labels: integer ``[..., N]``: c in [0, C) positive for class c, C background,
            -1 ignored (loss and gradient 0).
        alpha: weight of the positive class terms (negatives get 1 - alpha); None for none.
        gamma: focusing parameter >= 0.
        with_gradient: also return the L2 norm over the classes of dloss/dlogits.

    Returns:
        ``(loss [..., N], gradient norm [..., N] or None)``, float64.

    Raises:
        ValueError: shapes that do not fit, alpha outside [0, 1] or a negative gamma.

    Example:
        >>> logits = torch.tensor([[-4.6, -4.6], [2.0, -1.0]])
        >>> loss, grad = anchor_focal_loss(logits, torch.tensor([2, 0]), alpha=0.25, gamma=2.0, with_gradient=True)
    """
    alpha = _check_alpha(alpha)
    if not gamma >= 0.0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    if cls_logits.dim() < 2 or labels.shape != cls_logits.shape[:-1]:
        raise ValueError(f"labels must have the shape cls_logits.shape[:-1], got {tuple(labels.shape)} for logits "
                         f"{tuple(cls_logits.shape)}")
    x = cls_logits.detach().double()
    num_classes = x.shape[-1]
    target = labels[..., None] == torch.arange(num_classes, device=labels.device)  # (..., N) -> (..., N, C)
    x_t = torch.where(target, x, -x)  # the paper's x_t: p_t = sigmoid(x_t)
    log_p_t = F.logsigmoid(x_t)
    weight = torch.sigmoid(-x_t).pow(gamma)  # (1 - p_t)^gamma, exact for p_t near 1
    if alpha is not None:
        weight = weight * torch.where(target, x.new_tensor(alpha), x.new_tensor(1.0 - alpha))
    valid = (labels != IGNORE_LABEL).to(x.dtype)
    loss = -(weight * log_p_t).sum(dim=-1) * valid  # (..., N, C) -> (..., N)
    if not with_gradient:
        return loss, None
    p_t = torch.sigmoid(x_t)
    gradient = weight * (gamma * p_t * log_p_t + p_t - 1.0)  # dFL/dx_t; dx_t/dx = +-1 leaves the norm alone
    return loss, torch.linalg.vector_norm(gradient, dim=-1) * valid


@torch.no_grad()
def anchor_logits_and_labels(model: nn.Module, images: Sequence[Tensor],
                             targets: Sequence[Mapping[str, Any]]) -> tuple[Tensor, Tensor]:
    """Class logits and anchor labels of a batch, as ``FocalRetinaNet.compute_loss`` assigns them.

    The same calls as the model's training forward: its ``transform`` (resize, normalise,
    pad the batch to a multiple of 32), ``backbone``, classification head and
    ``anchor_generator``, then :func:`~detfocal.modeling.matching.split_crowd`, the model's
    ``match`` (IoU thresholds, low-quality matches, crowd rule) and
    :func:`~detfocal.modeling.head_loss.labels_from_matched_idxs`. The model's train/eval
    mode is left as it is (eval: BatchNorm's running statistics, as at inference).

    Args:
        model: a :class:`~detfocal.modeling.retinanet.FocalRetinaNet` (anything with
            torchvision RetinaNet's parts and a ``match`` method).
        images: float ``[3, H, W]`` tensors in [0, 1] on the model's device.
        targets: one dict per image with ``boxes`` ``[M, 4]`` (xyxy pixels), ``labels``
            ``[M]`` and optionally ``iscrowd`` ``[M]``, on the model's device.

    Returns:
        ``(cls_logits [B, N, C] float, labels [B, N] int64)``: c positive, C background,
        -1 ignored.

    Raises:
        ValueError: a model without ``match`` or ``head.classification_head``, or labels
            outside [0, C).
    """
    head = getattr(getattr(model, "head", None), "classification_head", None)
    if not callable(getattr(model, "match", None)) or head is None:
        raise ValueError(f"model must be a FocalRetinaNet (detfocal.modeling.build_retinanet), got "
                         f"{type(model).__name__}")
    image_list, resized = model.transform(list(images), [dict(target) for target in targets])
    features = model.backbone(image_list.tensors)
    features = list(features.values()) if isinstance(features, Mapping) else [features]
    cls_logits = head(features)  # (B, N, C)
    anchors = model.anchor_generator(image_list, features)
    kept, crowd_boxes = zip(*(split_crowd(target) for target in resized))
    matched_idxs = model.match(anchors, [target["boxes"] for target in kept], list(crowd_boxes))
    labels = labels_from_matched_idxs(list(kept), matched_idxs, cls_logits.shape[-1], cls_logits.shape[1])
    return cls_logits, labels


def collect_anchor_losses(model: nn.Module, batches: Iterable[tuple[Sequence[Tensor], Sequence[Mapping[str, Any]]]],
                          *, alpha: float | None, gammas: Sequence[float] = GAMMAS,
                          gradient_gammas: Sequence[float] = GRADIENT_GAMMAS) -> AnchorLosses:
    """Run ``model`` over ``batches`` and keep every anchor's loss at each gamma (see :class:`AnchorLosses`).

    Memory: about 8 (G + H + 2) bytes per anchor that takes a loss, e.g. 0.4 GB for 50
    images of COCO's ~120k anchors with the 4 + 2 default gammas.

    Args:
        model: as :func:`anchor_logits_and_labels`; its device receives the batches.
        batches: ``(images, targets)`` pairs, as a detection ``DataLoader`` yields them.
        alpha: the run's alpha (None for no weighting).
        gammas: the focusing parameters of ``losses``.
        gradient_gammas: those of ``gradient_norms``.

    Returns:
        The :class:`AnchorLosses`.

    Raises:
        ValueError: no batch, or as :func:`anchor_logits_and_labels`.
    """
    alpha = _check_alpha(alpha)
    gammas, gradient_gammas = tuple(float(g) for g in gammas), tuple(float(g) for g in gradient_gammas)
    device = next(model.parameters()).device
    columns: dict[str, list[np.ndarray]] = {key: [] for key in ("losses", "gradients", "positive", "probability",
                                                                "image", "anchors", "positives", "ignored")}
    num_images = 0
    for images, targets in batches:
        images = [image.to(device) for image in images]
        targets = [{key: value.to(device) if isinstance(value, Tensor) else value for key, value in target.items()}
                   for target in targets]
        cls_logits, labels = anchor_logits_and_labels(model, images, targets)
        num_classes = cls_logits.shape[-1]
        for logits_per_image, labels_per_image in zip(cls_logits, labels):
            valid = labels_per_image != IGNORE_LABEL
            logits, kept = logits_per_image[valid], labels_per_image[valid]  # (N, C) -> (K_i, C)
            losses, gradients = {}, {}
            for gamma in dict.fromkeys(gammas + gradient_gammas):  # each gamma once, in order
                losses[gamma], gradients[gamma] = anchor_focal_loss(logits, kept, alpha=alpha, gamma=gamma,
                                                                    with_gradient=gamma in gradient_gammas)
            columns["losses"].append(np.stack([losses[g].cpu().numpy() for g in gammas]))  # G x (K_i,) -> (G, K_i)
            columns["gradients"].append(np.stack([gradients[g].cpu().numpy() for g in gradient_gammas])
                                        if gradient_gammas else np.zeros((0, len(kept))))
            positive = kept < num_classes
            columns["positive"].append(positive.cpu().numpy())
            columns["probability"].append(torch.sigmoid(logits.double()).amax(dim=-1).cpu().numpy())
            columns["image"].append(np.full(len(kept), num_images, dtype=np.int64))
            columns["anchors"].append(np.array([len(labels_per_image)]))
            columns["positives"].append(np.array([int(positive.sum())]))
            columns["ignored"].append(np.array([int((~valid).sum())]))
            num_images += 1
    if not num_images:
        raise ValueError("batches: expected at least one batch of images, got none")
    logger.info("analysed %d images: %d anchors, %d of them ignored", num_images,
                sum(int(a[0]) for a in columns["anchors"]), sum(int(a[0]) for a in columns["ignored"]))
    return AnchorLosses(
        gammas=gammas, alpha=alpha, losses=np.concatenate(columns["losses"], axis=1),
        gradient_gammas=gradient_gammas, gradient_norms=np.concatenate(columns["gradients"], axis=1),
        positive=np.concatenate(columns["positive"]), max_probability=np.concatenate(columns["probability"]),
        image_index=np.concatenate(columns["image"]), anchors_per_image=np.concatenate(columns["anchors"]),
        positives_per_image=np.concatenate(columns["positives"]), ignored_per_image=np.concatenate(columns["ignored"]))


def run_focal_parameters(model: nn.Module,
                         head_config: Mapping[str, Any] | None = None) -> tuple[float | None, float | None]:
    """The run's ``(alpha, gamma)``: ``model.head.alpha`` and ``gamma`` of its config, else its head's attributes.

    Args:
        model: the trained detector (its classification head's ``alpha``/``gamma`` are the
            values the config built it with, defaults included).
        head_config: the run's ``model.head`` section, when at hand.

    Returns:
        ``(alpha, gamma)``; alpha None (or -1) means no weighting, gamma None that the head
        has none (then only the standard gammas are analysed).
    """
    head = getattr(getattr(model, "head", None), "classification_head", None)
    config = dict(head_config or {})
    alpha = config.get("alpha", getattr(head, "alpha", 0.25))
    gamma = config.get("gamma", getattr(head, "gamma", None))
    return _check_alpha(alpha), None if gamma is None else float(gamma)


def analyze_split(model: nn.Module, cfg: Any, *, label_to_category_id: Sequence[int], split: str = "val",
                  num_images: int = 200, alpha: float | None, gammas: Sequence[float] = GAMMAS,
                  generate_data: bool = False, progress: bool | None = None) -> AnchorLosses:
    """:func:`collect_anchor_losses` over the first ``num_images`` images of a config's split, one image at a time.

    The images are read without augmentation (the split's images as they are), in the
    dataset's order (sorted image ids), and each forms a batch of its own, so its anchors
    cover that image padded to a multiple of 32 and nothing more. (A training batch of
    images of different sizes pads them all to the largest, adding background anchors.)

    Args:
        model: the trained detector, as :func:`anchor_logits_and_labels`.
        cfg: the run's ``Config`` (its ``data`` section says where the split is).
        label_to_category_id: the model's category id of each label (from the checkpoint).
        split: "val" or "train".
        num_images: at most this many images, >= 1; a smaller split is analysed whole,
            with a warning.
        alpha: the run's alpha (see :func:`run_focal_parameters`).
        gammas: the focusing parameters compared.
        generate_data: generate the shapes dataset first where the config has one (only
            for a config the user named, never for one read from a checkpoint).
        progress: show a progress bar (default: when stderr is a terminal).

    Returns:
        The :class:`AnchorLosses`.

    Raises:
        ValueError: a bad ``split`` or ``num_images``, or a bad dataset.
        FileNotFoundError: the split's images or annotations do not exist.
    """
    from tqdm import tqdm

    from detfocal.config import data_paths, dataset_kwargs, shapes_kwargs
    from detfocal.data import CocoDetection, build_transforms
    from detfocal.data.shapes import ensure_dataset

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"--images must be an integer >= 1, got {num_images!r}")
    if generate_data and shapes_kwargs(cfg) is not None:
        ensure_dataset(**shapes_kwargs(cfg))
    images_dir, annotations = data_paths(cfg.data)[split]
    # The model's own categories, so that its labels and the annotations' ids line up.
    kwargs = dataset_kwargs(cfg, images_dir, annotations) | {"categories": list(label_to_category_id)}
    dataset = CocoDetection(**kwargs, transforms=build_transforms(train=False),
                            skip_bad_images=cfg.data.skip_bad_images)
    count = min(num_images, len(dataset))
    if count < num_images:
        logger.warning("the %s split (%s) holds %d images, fewer than the %d asked for: analysing all of them",
                       split, annotations, count, num_images)
    logger.info("analysing %d images of %s at alpha %s, gammas %s", count, annotations, alpha,
                ", ".join(f"{g:g}" for g in gammas))
    progress = sys.stderr.isatty() if progress is None else progress
    items = (dataset[index] for index in tqdm(range(count), desc="analyze", disable=not progress,
                                              dynamic_ncols=True, leave=False))
    return collect_anchor_losses(model, (([image], [target]) for image, target in items), alpha=alpha,
                                 gammas=gammas)
