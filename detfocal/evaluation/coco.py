"""COCO box evaluation: an evaluator fed by the model, results files, per-class tables.

Two interchangeable backends compute the same numbers: pycocotools, the reference, and
faster-coco-eval, which reimplements COCOeval's matching and accumulation in C++
(tests/test_evaluation.py checks that the stats, the per-class AP and the precision array
agree to 1e-9).
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import logging
import math
import numbers
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detfocal.data.subset import load_coco_annotations
from detfocal.utils.io import atomic_write, write_json_atomic

# Names of COCOeval.stats, in pycocotools' order. -1.0 means "no ground truth in that area range".
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# The values of eval.backend; "auto" is faster_coco_eval when it imports, else pycocotools.
BACKENDS = ("auto", "pycocotools", "faster_coco_eval")
# The columns of per_class.csv.
PER_CLASS_COLUMNS = ("class", "AP", "AP50", "AP75", "num_gt", "num_detections")

# Ground truth: a COCO object of either backend, a json path or a COCO dict.
CocoSource = COCO | str | Path | Mapping[str, Any]

logger = logging.getLogger(__name__)


def _quiet() -> contextlib.AbstractContextManager:
    """pycocotools prints progress on stdout; keep it out of the logs."""
    return contextlib.redirect_stdout(io.StringIO())


def _to_stdout(*args: Any) -> None:
    """faster-coco-eval's print_function (its default is its own logger): the current stdout, where
    _quiet() catches it as it catches pycocotools' output. Not ``print`` itself: given ``print``,
    COCOeval rebinds the COCO objects' output too."""
    sys.stdout.write(" ".join(map(str, args)) + "\n")


def resolve_backend(backend: str = "auto") -> str:
    """The backend that ``backend`` runs: "pycocotools" or "faster_coco_eval".

    Args:
        backend: one of :data:`BACKENDS`; "auto" is faster_coco_eval when it imports, else
            pycocotools (with a warning, once).

    Returns:
        "pycocotools" or "faster_coco_eval".

    Raises:
        ValueError: ``backend`` is unknown, or is "faster_coco_eval" and that is not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"eval.backend: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "pycocotools":
        return backend
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError as exc:
        if backend == "faster_coco_eval":
            raise ValueError(f"eval.backend: faster_coco_eval cannot be imported ({exc}); "
                             f"pip install faster-coco-eval, or set eval.backend=pycocotools") from None
        warnings.warn(f"eval.backend=auto: faster_coco_eval cannot be imported ({exc}); evaluating with "
                      f"pycocotools (same numbers, slower). pip install faster-coco-eval", stacklevel=2)
        return "pycocotools"
    return "faster_coco_eval"


def _backend_classes(backend: str) -> tuple[type, Callable[..., Any]]:
    """(COCO class, COCOeval constructor) of a resolved backend."""
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster

        return FasterCOCO, functools.partial(COCOeval_faster, print_function=_to_stdout)
    return COCO, COCOeval


def load_coco(coco_gt: CocoSource, backend: str = "auto") -> Any:
    """Return a COCO object of the backend for a COCO object, a json path or a COCO dict.

    A COCO object of the other backend is re-indexed over the same ``dataset`` dict (not a
    copy). Paths and dicts are validated; COCO objects are taken as they are.

    Args:
        coco_gt: the ground truth.
        backend: one of :data:`BACKENDS`.

    Returns:
        A ``pycocotools.coco.COCO`` or a ``faster_coco_eval.COCO``.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the annotations are malformed, or the backend is unknown or not installed.
    """
    coco_class, _ = _backend_classes(resolve_backend(backend))
    if isinstance(coco_gt, coco_class):
        return coco_gt
    coco = coco_class()
    # Both backends' COCO objects have loadRes; paths and dicts do not.
    coco.dataset = coco_gt.dataset if hasattr(coco_gt, "loadRes") else load_coco_annotations(coco_gt)
    with _quiet():
        coco.createIndex()
    return coco


def _load_detections(coco_gt: Any, results: list[dict[str, Any]]) -> Any:
    """``coco_gt.loadRes(results)``, also for zero detections (pycocotools' loadRes indexes results[0])."""
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
    empty = type(coco_gt)()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                     "annotations": []}
    with _quiet():
        empty.createIndex()
    return empty


def _class_precision(coco_eval: Any, k: int, iou: float | None = None) -> float:
    """AP of the k-th category (area all, 100 detections) over IoU 0.50:0.95, or at IoU ``iou``.

    -1.0 for a category without ground truth.
    """
    # precision: (iou thresholds, recall thresholds, categories, area ranges, max dets);
    # area index 0 is "all", max-dets index -1 is 100, as in the AP stat.
    values = coco_eval.eval["precision"][:, :, k, 0, -1]
    if iou is not None:
        values = values[int(np.argmin(np.abs(coco_eval.params.iouThrs - iou)))]
    values = values[values > -1]
    return float(values.mean()) if values.size else -1.0


def _run_cocoeval(coco_gt: Any, coco_dt: Any, img_ids: Sequence[int] | None, verbose: bool,
                  backend: str) -> tuple[Any, dict[str, Any]]:
    """Evaluate boxes; return the COCOeval (for its precision array) and the summary dict."""
    _, make_cocoeval = _backend_classes(backend)
    coco_eval = make_cocoeval(coco_gt, coco_dt, iouType="bbox")
    if img_ids is not None:
        coco_eval.params.imgIds = sorted(img_ids)
    with _quiet():
        coco_eval.evaluate()
        coco_eval.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):  # both backends print the table
        coco_eval.summarize()
    if verbose:
        logger.info("%s", table.getvalue().rstrip("\n"))
    # faster-coco-eval appends more stats after the 12 of pycocotools; zip keeps those 12.
    summary: dict[str, Any] = {name: float(value) for name, value in zip(STAT_NAMES, coco_eval.stats)}
    summary["per_class"] = {coco_gt.cats[int(category_id)]["name"]: _class_precision(coco_eval, k)
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
        coco_dt = _load_detections(self.coco_gt, self.results())
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
    if isinstance(results_json, (str, os.PathLike)):
        if not Path(results_json).is_file():
            raise FileNotFoundError(f"results_json: {results_json} does not exist")
        try:
            with open(results_json, "r", encoding="utf-8") as handle:
                results = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ValueError(f"results_json: {results_json} is not valid UTF-8 json "
                             f"({type(exc).__name__}: {exc})") from None
        if not isinstance(results, list):
            raise ValueError(f"results_json: {results_json} holds a {type(results).__name__}, "
                             f"expected a list of detections")
    elif not isinstance(results_json, list):
        raise ValueError(f"results_json: expected a list of detections or the path of a json holding one, "
                         f"got a {type(results_json).__name__}")
    else:
        results = results_json
    # Copies: loadRes adds keys to each detection, and the caller's dicts stay as they were.
    results = [_checked_detection(index, result) for index, result in enumerate(results)]
    _, summary = _run_cocoeval(coco_gt, _load_detections(coco_gt, results), None, verbose, backend)
    return summary


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _checked_detection(index: int, result: Any) -> dict[str, Any]:
    """A copy of one COCO results entry with plain ints and floats, or a ValueError saying what is wrong.

    Both backends would otherwise fail inside ``loadRes`` (or in C++) with a message that names
    neither the detection nor the field.
    """
    if not isinstance(result, Mapping):
        raise ValueError(f"results_json: detection {index} is a {type(result).__name__} ({result!r:.60}), "
                         f"expected a dict with image_id, category_id, bbox and score")
    missing = [key for key in ("image_id", "category_id", "bbox", "score") if key not in result]
    if missing:
        raise ValueError(f"results_json: detection {index} has no {missing}")
    for key in ("image_id", "category_id"):
        if not _is_integer(result[key]):
            raise ValueError(f"results_json: detection {index} has {key} {result[key]!r:.60}, expected an int")
    bbox = result["bbox"]
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(map(_is_finite, bbox)):
        raise ValueError(f"results_json: detection {index} has bbox {bbox!r:.100}, "
                         f"expected [x, y, w, h], four finite numbers")
    if not _is_finite(result["score"]):
        raise ValueError(f"results_json: detection {index} has score {result['score']!r:.60}, "
                         f"expected a finite number")
    return {**result, "image_id": int(result["image_id"]), "category_id": int(result["category_id"]),
            "bbox": [float(value) for value in bbox], "score": float(result["score"])}


def per_class_table(evaluator: CocoEvaluator) -> list[dict[str, Any]]:
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
        rows.append({"class": coco_eval.cocoGt.cats[category_id]["name"], "AP": _class_precision(coco_eval, k),
                     "AP50": _class_precision(coco_eval, k, 0.5), "AP75": _class_precision(coco_eval, k, 0.75),
                     "num_gt": num_gt.get(category_id, 0), "num_detections": num_detections.get(category_id, 0)})
    return rows


def write_per_class_csv(evaluator: CocoEvaluator, path: str | Path) -> Path:
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
