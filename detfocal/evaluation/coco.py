"""COCO box evaluation: an evaluator fed by the model, and the evaluation of a results file.

Two interchangeable backends compute the same numbers (:mod:`.backends`): pycocotools, the
reference, and faster-coco-eval, which reimplements COCOeval's matching and accumulation
in C++. Results files are checked in :mod:`.results`; the per-class table and CSV are in
:mod:`.per_class`.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .backends import (BACKENDS, CocoSource, backend_classes, load_coco, load_detections, quiet,
                       resolve_backend)
from .per_class import PER_CLASS_COLUMNS, class_precision, per_class_table, write_per_class_csv
from .results import load_results
from detfocal.utils.io import write_json_atomic

# Also importable from here, where they lived before backends.py, per_class.py and results.py.
__all__ = ["BACKENDS", "PER_CLASS_COLUMNS", "STAT_NAMES", "CocoEvaluator", "CocoSource", "evaluate_results",
           "load_coco", "per_class_table", "resolve_backend", "write_per_class_csv"]

# Names of COCOeval.stats, in pycocotools' order. -1.0 means "no ground truth in that area range".
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

logger = logging.getLogger(__name__)


def _run_cocoeval(coco_gt: Any, coco_dt: Any, img_ids: Sequence[int] | None, verbose: bool,
                  backend: str) -> tuple[Any, dict[str, Any]]:
    """Evaluate boxes; return the COCOeval (for its precision array) and the summary dict."""
    _, make_cocoeval = backend_classes(backend)
    coco_eval = make_cocoeval(coco_gt, coco_dt, iouType="bbox")
    if img_ids is not None:
        coco_eval.params.imgIds = sorted(img_ids)
    with quiet():
        coco_eval.evaluate()
        coco_eval.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):  # both backends print the table
        coco_eval.summarize()
    if verbose:
        logger.info("%s", table.getvalue().rstrip("\n"))
    # faster-coco-eval appends more stats after the 12 of pycocotools; zip keeps those 12.
    summary: dict[str, Any] = {name: float(value) for name, value in zip(STAT_NAMES, coco_eval.stats)}
    summary["per_class"] = {coco_gt.cats[int(category_id)]["name"]: class_precision(coco_eval, k)
                            for k, category_id in enumerate(coco_eval.params.catIds)}
    return coco_eval, summary


class CocoEvaluator:
    """Collect a detector's predictions and compute the COCO box metrics.

    Args:
        coco_gt: ground truth: a COCO object of either backend (e.g. ``CocoDetection.coco``),
            a json path or a COCO dict.
        label_to_category_id: ``label_to_category_id[label]`` is the COCO category id of a
            contiguous label (``CocoDetection.label_to_category_id``).
        img_ids: evaluate only these images; None evaluates every ground-truth image, so images
            without predictions count as misses.
        backend: one of :data:`BACKENDS` (``eval.backend``); both give the same numbers.

    Attributes:
        backend: the backend that runs, "pycocotools" or "faster_coco_eval".
        coco_eval: the backend's COCOeval after ``summarize()`` (its ``eval["precision"]``
            feeds the per-class table and the PR curves), else None.

    Raises:
        ValueError: a category id is not in the ground truth or repeats, an image id is not in
            the ground truth, or the backend is unknown or not installed.

    Example:
        >>> evaluator = CocoEvaluator(dataset.coco, dataset.label_to_category_id)
        >>> evaluator.update({target["image_id"]: output for target, output in zip(targets, outputs)})
        >>> evaluator.summarize()["AP"]
    """

    def __init__(self, coco_gt: CocoSource, label_to_category_id: Sequence[int], img_ids: Sequence[int] | None = None,
                 backend: str = "auto") -> None:
        self.backend = resolve_backend(backend)
        self.coco_gt = load_coco(coco_gt, self.backend)
        self.label_to_category_id = [int(category_id) for category_id in label_to_category_id]
        unknown = sorted(set(self.label_to_category_id) - set(self.coco_gt.getCatIds()))
        if unknown:
            raise ValueError(f"label_to_category_id: ids {unknown} are not in the ground truth's categories "
                             f"{self.coco_gt.getCatIds()}")
        if len(set(self.label_to_category_id)) != len(self.label_to_category_id):
            raise ValueError(f"label_to_category_id: expected distinct ids, got {self.label_to_category_id}")
        self._gt_img_ids = set(self.coco_gt.getImgIds())
        if img_ids is not None:
            missing = sorted(set(img_ids) - self._gt_img_ids)
            if missing:
                raise ValueError(f"img_ids: {len(missing)} ids are not in the ground truth, e.g. {missing[:5]}")
        self.img_ids = None if img_ids is None else [int(i) for i in img_ids]
        self._category_ids = np.asarray(self.label_to_category_id, dtype=np.float64)
        # image id -> (N, 6) array of x, y, w, h, score, category id; this rank's predictions.
        self._local: dict[int, np.ndarray] = {}
        # All ranks' predictions once synchronize() has run, None while updates are pending.
        self._merged: dict[int, np.ndarray] | None = None
        self.coco_eval: Any = None
        self.summary: dict[str, Any] | None = None

    def update(self, predictions: Mapping[Any, Mapping[str, torch.Tensor]]) -> None:
        """Add predictions; a repeated image id replaces the earlier ones.

        Args:
            predictions: ``{image_id: {"boxes": [N, 4] xyxy in original image pixels,
                "scores": [N], "labels": [N] contiguous labels}}``; tensors on any device.

        Raises:
            ValueError: an image id is not in the ground truth, shapes disagree or a label is
                outside [0, num_classes).
        """
        num_classes = len(self.label_to_category_id)
        for image_id, prediction in predictions.items():
            image_id = int(image_id)
            if image_id not in self._gt_img_ids:
                raise ValueError(f"predictions: image id {image_id} is not in the ground truth")
            boxes = torch.as_tensor(prediction["boxes"]).detach().to("cpu", torch.float64).numpy().reshape(-1, 4)
            scores = torch.as_tensor(prediction["scores"]).detach().to("cpu", torch.float64).numpy().reshape(-1)
            labels = torch.as_tensor(prediction["labels"]).detach().to("cpu", torch.int64).numpy().reshape(-1)
            if not len(boxes) == len(scores) == len(labels):
                raise ValueError(f"predictions[{image_id}]: boxes, scores and labels have lengths "
                                 f"{len(boxes)}, {len(scores)}, {len(labels)}; expected equal")
            if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"predictions[{image_id}]: labels must be in [0, {num_classes}), "
                                 f"got values from {labels.min()} to {labels.max()}")
            widths_heights = boxes[:, 2:] - boxes[:, :2]  # COCO results want (x, y, w, h)
            self._local[image_id] = np.column_stack([boxes[:, :2], widths_heights, scores, self._category_ids[labels]])
        self._merged = None

    def synchronize(self) -> None:
        """Gather every rank's predictions; under DDP, call it on all ranks before summarize().

        Without an initialised process group it only marks the local predictions as final.
        An image predicted on several ranks (DistributedSampler pads with repeats) keeps the
        lowest rank's predictions, so it is not counted twice.
        """
        parts = [self._local]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self._local)
        merged: dict[int, np.ndarray] = {}
        for part in parts:
            for image_id, rows in part.items():
                merged.setdefault(image_id, rows)
        self._merged = merged

    def results(self) -> list[dict[str, Any]]:
        """The gathered predictions as a COCO results list (synchronizes first if needed)."""
        if self._merged is None:
            self.synchronize()
        results = []
        for image_id in sorted(self._merged):
            for x, y, w, h, score, category_id in self._merged[image_id].tolist():
                results.append({"image_id": image_id, "category_id": int(category_id),
                                "bbox": [x, y, w, h], "score": score})
        return results

    def summarize(self, verbose: bool = False) -> dict[str, Any]:
        """Compute the 12 COCO stats and the per-class AP.

        Under DDP, either call it on every rank or call ``synchronize()`` on every rank first.

        Args:
            verbose: log the standard COCO table (INFO, logger ``detfocal.evaluation.coco``).

        Returns:
            ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
            "ARl": float, "per_class": {category name: AP}}``. A stat is -1.0 where the ground
            truth has no box of that area range (pycocotools' convention), and a class's AP is
            -1.0 when it has no ground-truth box. With no predictions every other stat is 0.0.
        """
        coco_dt = load_detections(self.coco_gt, self.results())
        self.coco_eval, self.summary = _run_cocoeval(self.coco_gt, coco_dt, self.img_ids, verbose,
                                                     self.backend)
        return self.summary

    def write_results(self, path: str | Path) -> Path:
        """Write the COCO results json atomically (temp file, then os.replace); return its path."""
        return write_json_atomic(path, self.results())


def evaluate_results(gt_json: CocoSource, results_json: str | Path | list[dict[str, Any]], verbose: bool = False,
                     backend: str = "auto") -> dict[str, Any]:
    """Evaluate a COCO results file against ground truth; the dict of ``CocoEvaluator.summarize``.

    Args:
        gt_json: ground-truth json path, COCO dict or COCO object.
        results_json: COCO results json path (a list of ``{"image_id", "category_id", "bbox",
            "score"}``) or the loaded list.
        verbose: log the standard COCO table (INFO, logger ``detfocal.evaluation.coco``).
        backend: one of :data:`BACKENDS`; :func:`resolve_backend` tells which one "auto" runs.

    Returns:
        The 12 stats by name plus ``per_class``.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file is malformed, ``results_json`` is not a list of detections, a
            detection is not a dict or has a missing or mistyped field (the message names its
            index and the field), results name images or categories missing from the ground
            truth, or the backend is unknown or not installed.
    """
    backend = resolve_backend(backend)
    coco_gt = load_coco(gt_json, backend)
    results = load_results(results_json)
    _, summary = _run_cocoeval(coco_gt, load_detections(coco_gt, results), None, verbose, backend)
    return summary
