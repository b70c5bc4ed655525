"""Per-class COCO metrics: each category's AP from COCOeval's precision array, as a table and a CSV."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from detfocal.utils.io import atomic_write

__all__ = ["PER_CLASS_COLUMNS", "EvaluatorLike", "class_precision", "per_class_table", "write_per_class_csv"]

# The columns of per_class.csv.
PER_CLASS_COLUMNS = ("class", "AP", "AP50", "AP75", "num_gt", "num_detections")


class EvaluatorLike(Protocol):
    """What the table reads of a :class:`~detfocal.evaluation.CocoEvaluator` (which imports this module)."""

    coco_eval: Any

    def summarize(self, verbose: bool = False) -> dict[str, Any]: ...


def class_precision(coco_eval: Any, k: int, iou: float | None = None) -> float:
    """AP of the k-th category (area all, 100 detections) over IoU 0.50:0.95, or at IoU ``iou``.

    Args:
        coco_eval: a COCOeval of either backend after ``accumulate()``.
        k: the category's index in ``coco_eval.params.catIds``.
        iou: None for the mean over IoU 0.50:0.95, else the IoU threshold nearest this one.

    Returns:
        The AP, or -1.0 for a category without ground truth.
    """
    # precision: (iou thresholds, recall thresholds, categories, area ranges, max dets);
    # area index 0 is "all", max-dets index -1 is 100, as in the AP stat.
    values = coco_eval.eval["precision"][:, :, k, 0, -1]
    if iou is not None:
        values = values[int(np.argmin(np.abs(coco_eval.params.iouThrs - iou)))]
    values = values[values > -1]
    return float(values.mean()) if values.size else -1.0


def per_class_table(evaluator: EvaluatorLike) -> list[dict[str, Any]]:
    """One row per ground-truth category: its AP, AP50, AP75 and box counts in the evaluated images.

    The evaluator is summarized now if it has not been.

    Args:
        evaluator: a CocoEvaluator.

    Returns:
        ``[{"class": name, "AP", "AP50", "AP75": float, "num_gt", "num_detections": int}]`` in
        category-id order. AP is over IoU 0.50:0.95 (area all, 100 detections per image), as
        in ``summarize()["per_class"]``, and -1.0 for a class without ground truth. ``num_gt``
        counts non-crowd ground-truth boxes (crowd boxes are ignored by the matching);
        ``num_detections`` counts every detection, before the 100-per-image cap.
    """
    if evaluator.coco_eval is None:
        evaluator.summarize()
    coco_eval = evaluator.coco_eval
    evaluated = {int(image_id) for image_id in coco_eval.params.imgIds}
    num_gt: dict[int, int] = {}
    for ann in coco_eval.cocoGt.dataset["annotations"]:
        if ann["image_id"] in evaluated and not ann.get("iscrowd", 0):
            num_gt[ann["category_id"]] = num_gt.get(ann["category_id"], 0) + 1
    num_detections: dict[int, int] = {}
    for ann in coco_eval.cocoDt.dataset["annotations"]:
        if ann["image_id"] in evaluated:
            num_detections[ann["category_id"]] = num_detections.get(ann["category_id"], 0) + 1
    rows = []
    for k, category_id in enumerate(int(c) for c in coco_eval.params.catIds):
        rows.append({"class": coco_eval.cocoGt.cats[category_id]["name"], "AP": class_precision(coco_eval, k),
                     "AP50": class_precision(coco_eval, k, 0.5), "AP75": class_precision(coco_eval, k, 0.75),
                     "num_gt": num_gt.get(category_id, 0), "num_detections": num_detections.get(category_id, 0)})
    return rows


def write_per_class_csv(evaluator: EvaluatorLike, path: str | Path) -> Path:
    """Write :func:`per_class_table` as a CSV (atomically), with the columns of :data:`PER_CLASS_COLUMNS`.

    AP values have 4 decimals; a class without ground truth has empty AP cells (and num_gt 0),
    so spreadsheets leave it out of averages.

    Args:
        evaluator: a CocoEvaluator, summarized now if it has not been.
        path: the output file, e.g. ``run/per_class.csv``; parent folders are created.

    Returns:
        The path written.

    Example:
        >>> write_per_class_csv(evaluator, "runs/demo/per_class.csv")
    """
    rows = per_class_table(evaluator)

    def write(handle: Any) -> None:
        writer = csv.DictWriter(handle, PER_CLASS_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{name: "" if row[name] < 0 else f"{row[name]:.4f}"
                                       for name in ("AP", "AP50", "AP75")}})

    return atomic_write(path, write, binary=False)
