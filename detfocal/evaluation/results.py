"""COCO results lists (``[{"image_id", "category_id", "bbox", "score"}]``): read from json and checked."""
from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Mapping

__all__ = ["load_results"]


def load_results(results_json: str | Path | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checked detections of a COCO results json, or of the loaded list.

    Args:
        results_json: COCO results json path (a list of ``{"image_id", "category_id", "bbox",
            "score"}``) or the loaded list.

    Returns:
        Copies of the detections with plain ints and floats (``loadRes`` adds keys to each
        detection; the caller's dicts stay as they were).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not UTF-8 json, ``results_json`` is not a list of detections,
            or a detection is not a dict or has a missing or mistyped field (the message
            names its index and the field).
    """
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
    return [_checked_detection(index, result) for index, result in enumerate(results)]


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
