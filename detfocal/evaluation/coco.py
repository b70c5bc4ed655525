"""COCO box evaluation with pycocotools: an evaluator fed by the model, results files, PR plots."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detfocal.data.subset import load_coco_annotations
from detfocal.io import write_json_atomic

# Names of COCOeval.stats, in pycocotools' order. -1.0 means "no ground truth in that area range".
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

CocoSource = COCO | str | Path | Mapping[str, Any]


def _quiet() -> contextlib.AbstractContextManager:
    """pycocotools prints progress on stdout; keep it out of the logs."""
    return contextlib.redirect_stdout(io.StringIO())


def load_coco(coco_gt: CocoSource) -> COCO:
    """Return a pycocotools COCO object for a COCO object, a json path or a COCO dict.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the annotations are malformed.
    """
    if isinstance(coco_gt, COCO):
        return coco_gt
    coco = COCO()
    coco.dataset = load_coco_annotations(coco_gt)
    with _quiet():
        coco.createIndex()
    return coco


def _load_detections(coco_gt: COCO, results: list[dict[str, Any]]) -> COCO:
    """``coco_gt.loadRes(results)``, also for zero detections (loadRes indexes results[0])."""
    unknown_images = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
    if unknown_images:
        raise ValueError(f"results: {len(unknown_images)} image ids are not in the ground truth, "
                         f"e.g. {sorted(unknown_images)[:5]}")
    unknown_categories = {r["category_id"] for r in results} - set(coco_gt.getCatIds())
    if unknown_categories:
        raise ValueError(f"results: category ids {sorted(unknown_categories)[:10]} are not in the ground truth "
                         f"(known: {coco_gt.getCatIds()}); is a contiguous label being used as a category id?")
    if results:
        with _quiet():
            return coco_gt.loadRes(results)
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                     "annotations": []}
    with _quiet():
        empty.createIndex()
    return empty


def _run_cocoeval(coco_gt: COCO, coco_dt: COCO, img_ids: Sequence[int] | None, verbose: bool) -> tuple[COCOeval, dict[str, Any]]:
    """Evaluate boxes; return the COCOeval (for its precision array) and the summary dict."""
    coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if img_ids is not None:
        coco_eval.params.imgIds = sorted(img_ids)
    with _quiet():
        coco_eval.evaluate()
        coco_eval.accumulate()
    with contextlib.nullcontext() if verbose else _quiet():
        coco_eval.summarize()
    summary: dict[str, Any] = {name: float(value) for name, value in zip(STAT_NAMES, coco_eval.stats)}
    # precision: (iou thresholds, recall thresholds, categories, area ranges, max dets);
    # area index 0 is "all", max-dets index -1 is 100, as in the AP stat.
    precision = coco_eval.eval["precision"]
    per_class = {}
    for k, category_id in enumerate(coco_eval.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        per_class[coco_gt.cats[category_id]["name"]] = float(values.mean()) if values.size else -1.0
    summary["per_class"] = per_class
    return coco_eval, summary


class CocoEvaluator:
    """Collect a detector's predictions and compute the COCO box metrics with pycocotools.

    Args:
        coco_gt: ground truth: a pycocotools COCO object (e.g. ``CocoDetection.coco``), a json
            path or a COCO dict.
        label_to_category_id: ``label_to_category_id[label]`` is the COCO category id of a
            contiguous label (``CocoDetection.label_to_category_id``).
        img_ids: evaluate only these images; None evaluates every ground-truth image, so images
            without predictions count as misses.

    Raises:
        ValueError: a category id is not in the ground truth or repeats, or an image id is
            not in the ground truth.

    Example:
        >>> evaluator = CocoEvaluator(dataset.coco, dataset.label_to_category_id)
        >>> evaluator.update({target["image_id"]: output for target, output in zip(targets, outputs)})
        >>> evaluator.summarize()["AP"]
    """

    def __init__(self, coco_gt: CocoSource, label_to_category_id: Sequence[int], img_ids: Sequence[int] | None = None) -> None:
        self.coco_gt = load_coco(coco_gt)
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
        self.coco_eval: COCOeval | None = None
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
            verbose: print pycocotools' standard table.

        Returns:
            ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
            "ARl": float, "per_class": {category name: AP}}``. A stat is -1.0 where the ground
            truth has no box of that area range (pycocotools' convention), and a class's AP is
            -1.0 when it has no ground-truth box. With no predictions every other stat is 0.0.
        """
        coco_dt = _load_detections(self.coco_gt, self.results())
        self.coco_eval, self.summary = _run_cocoeval(self.coco_gt, coco_dt, self.img_ids, verbose)
        return self.summary

    def write_results(self, path: str | Path) -> Path:
        """Write the COCO results json atomically (temp file, then os.replace); return its path."""
        return write_json_atomic(path, self.results())


def evaluate_results(gt_json: CocoSource, results_json: str | Path | list[dict[str, Any]], verbose: bool = False) -> dict[str, Any]:
    """Evaluate a COCO results file against ground truth; the dict of ``CocoEvaluator.summarize``.

    Args:
        gt_json: ground-truth json path, COCO dict or COCO object.
        results_json: COCO results json path (a list of ``{"image_id", "category_id", "bbox",
            "score"}``) or the loaded list.
        verbose: print pycocotools' standard table.

    Returns:
        The 12 stats by name plus ``per_class``.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file is malformed, or results name images or categories missing from the
            ground truth.
    """
    coco_gt = load_coco(gt_json)
    if isinstance(results_json, (str, Path)):
        if not Path(results_json).is_file():
            raise FileNotFoundError(f"results_json: {results_json} does not exist")
        with open(results_json, "r", encoding="utf-8") as handle:
            results = json.load(handle)
    else:
        # loadRes adds keys to each detection; leave the caller's dicts alone.
        results = [dict(result) for result in results_json]
    if not isinstance(results, list):
        raise ValueError(f"results_json: {results_json} holds a {type(results).__name__}, expected a list of detections")
    for index, result in enumerate(results):
        missing = [key for key in ("image_id", "category_id", "bbox", "score") if key not in result]
        if missing:
            raise ValueError(f"results_json: detection {index} has no {missing}")
    _, summary = _run_cocoeval(coco_gt, _load_detections(coco_gt, results), None, verbose)
    return summary
