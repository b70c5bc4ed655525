"""The statistics of ``detfocal analyze``: per-anchor losses reduced to Figure 4's curves and the
table's shares (:func:`summarize`), with the container they are computed from (:class:`AnchorLosses`).

Plain NumPy on float64 arrays: :mod:`detfocal.evaluation.analysis` computes the losses, this
module only counts and sorts them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["EASY_FRACTION", "EASY_PROBABILITY", "GAMMAS", "GRADIENT_GAMMAS", "AnchorLosses", "cumulative_loss",
           "hardest_fraction", "summarize"]


# The gammas of Lin et al. 2017, Figure 4 (0 is alpha-balanced cross entropy).
GAMMAS = (0.0, 0.5, 1.0, 2.0)
# Cross entropy against the paper's focal loss, as GHM's Figure 1 compares them.
GRADIENT_GAMMAS = (0.0, 2.0)
# "The easiest 90% of negatives" and "negatives the model already puts below p = 0.01".
EASY_FRACTION = 0.9
EASY_PROBABILITY = 0.01


@dataclass(frozen=True)
class AnchorLosses:
    """Per-anchor values of the analysed images; ignored anchors are counted only.

    K is the number of anchors that take a loss (positives and negatives) over all images,
    G the number of gammas, H the number of gradient gammas, I the number of images.

    Attributes:
        gammas: the G focusing parameters of ``losses``.
        alpha: the alpha every loss used (None: no weighting).
        losses: float64 ``[G, K]``, each anchor's loss summed over the classes.
        gradient_gammas: the H gammas of ``gradient_norms``.
        gradient_norms: float64 ``[H, K]``, the L2 norm over the classes of dloss/dlogits.
        positive: bool ``[K]``, anchors matched to a box.
        max_probability: float64 ``[K]``, the anchor's highest class probability.
        image_index: int64 ``[K]``, the analysed image (0 .. I-1) the anchor belongs to.
        anchors_per_image: int64 ``[I]``, all anchors, ignored ones included.
        positives_per_image: int64 ``[I]``.
        ignored_per_image: int64 ``[I]``.
    """

    gammas: tuple[float, ...]
    alpha: float | None
    losses: np.ndarray
    gradient_gammas: tuple[float, ...]
    gradient_norms: np.ndarray
    positive: np.ndarray
    max_probability: np.ndarray
    image_index: np.ndarray
    anchors_per_image: np.ndarray
    positives_per_image: np.ndarray
    ignored_per_image: np.ndarray

    @property
    def num_images(self) -> int:
        return len(self.anchors_per_image)


# --------------------------------------------------------------------------------------
# Statistics.
# --------------------------------------------------------------------------------------
def cumulative_loss(losses: np.ndarray, num_points: int = 1001) -> tuple[np.ndarray, np.ndarray]:
    """Lin et al. 2017, Figure 4: the cumulative normalised loss, samples sorted from low to high loss.

    Args:
        losses: ``[K]`` per-sample losses (one group: positives or negatives).
        num_points: points of the grid x = 0, 1 / (num_points - 1), ..., 1.

    Returns:
        ``(x, y)``: y[j] is the share of the group's total loss carried by the floor(x[j] K)
        lowest-loss samples (0 where the total is 0).
    """
    x = np.linspace(0.0, 1.0, num_points)
    total = float(np.sum(losses, dtype=np.float64))
    if len(losses) == 0 or total <= 0.0:
        return x, np.zeros(num_points)
    cumulative = np.concatenate([[0.0], np.cumsum(np.sort(losses), dtype=np.float64)])  # (K,) -> (K + 1,)
    counts = np.arange(num_points) * len(losses) // (num_points - 1)  # floor(x K) in integers: no rounding
    return x, cumulative[counts] / total


def hardest_fraction(losses: np.ndarray, share: float = 0.5) -> float | None:
    """The smallest fraction of samples, hardest first, whose losses sum to at least ``share`` of the total.

    Returns:
        A fraction in (0, 1], or None for no samples or a zero total.
    """
    total = float(np.sum(losses, dtype=np.float64))
    if len(losses) == 0 or total <= 0.0:
        return None
    cumulative = np.cumsum(np.sort(losses)[::-1], dtype=np.float64)
    count = int(np.searchsorted(cumulative, share * total)) + 1  # the first prefix reaching the share
    return min(count, len(losses)) / len(losses)


def _share(part: float, total: float) -> float | None:
    return part / total if total > 0 else None


def _per_gamma(result: AnchorLosses, losses: np.ndarray, easy_fraction: float,
               easy_probability: float) -> dict[str, Any]:
    negative = ~result.positive
    negative_losses = losses[negative]
    total = float(np.sum(losses, dtype=np.float64))
    num_easy = int(np.floor(easy_fraction * len(negative_losses) + 1e-9))
    easy = float(np.sum(np.sort(negative_losses)[:num_easy], dtype=np.float64))
    confident = float(np.sum(losses[negative & (result.max_probability < easy_probability)], dtype=np.float64))
    # Effective negatives of an image: their summed loss in units of its hardest negative's.
    images = result.image_index[negative]
    sums = np.bincount(images, weights=negative_losses, minlength=result.num_images)
    hardest = np.zeros(result.num_images)
    np.maximum.at(hardest, images, negative_losses)
    effective = np.divide(sums, hardest, out=np.zeros(result.num_images), where=hardest > 0)
    positives_per_image = float(np.mean(result.positives_per_image))
    return {
        "negative_loss_share": _share(float(np.sum(negative_losses, dtype=np.float64)), total),
        "easy_negative_loss_share": _share(easy, total),
        "confident_negative_loss_share": _share(confident, total),
        "effective_negatives_per_image": float(np.mean(effective)),
        "effective_negatives_per_positive": _share(float(np.mean(effective)), positives_per_image),
        "hardest_negatives_for_half_loss": hardest_fraction(negative_losses),
        "hardest_positives_for_half_loss": hardest_fraction(losses[result.positive]),
    }


def summarize(result: AnchorLosses, *, easy_fraction: float = EASY_FRACTION,
              easy_probability: float = EASY_PROBABILITY) -> dict[str, Any]:
    """The table of ``detfocal analyze`` as a JSON-ready dict.

    Args:
        result: from :func:`collect_anchor_losses`.
        easy_fraction: the lowest-loss fraction of negatives called "easy".
        easy_probability: negatives whose highest class probability is below it are "confident".

    Returns:
        ``images``; means per image of ``anchors``, ``positives``, ``ignored`` and
        ``negatives``; ``negatives_per_positive`` (over all images; None without
        positives); ``alpha``, ``easy_fraction``, ``easy_probability``; and ``per_gamma``, one
        dict per gamma with ``gamma`` and the shares of the total classification loss
        carried by the negatives (``negative_loss_share``), the easiest ``easy_fraction`` of
        them by that gamma's loss (``easy_negative_loss_share``) and those below
        ``easy_probability`` (``confident_negative_loss_share``);
        ``effective_negatives_per_image`` (mean over images of sum / max of the negatives'
        losses), ``effective_negatives_per_positive``, and the smallest fractions of
        negatives and of positives, hardest first, that carry half of their group's loss.
        A share of a zero total is None.
    """
    num_negatives = int(np.sum(result.anchors_per_image - result.positives_per_image - result.ignored_per_image))
    num_positives = int(np.sum(result.positives_per_image))
    summary: dict[str, Any] = {
        "images": result.num_images,
        "anchors_per_image": float(np.mean(result.anchors_per_image)),
        "positives_per_image": float(np.mean(result.positives_per_image)),
        "ignored_per_image": float(np.mean(result.ignored_per_image)),
        "negatives_per_image": num_negatives / result.num_images,
        "negatives_per_positive": _share(num_negatives, num_positives),
        "alpha": result.alpha, "easy_fraction": easy_fraction, "easy_probability": easy_probability,
        "per_gamma": [],
    }
    for gamma, losses in zip(result.gammas, result.losses):
        summary["per_gamma"].append({"gamma": gamma, **_per_gamma(result, losses, easy_fraction, easy_probability)})
    return summary
