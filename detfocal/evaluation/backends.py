"""The two COCO evaluation backends: choosing one, and loading ground truth and detections into it.

pycocotools is the reference; faster-coco-eval reimplements COCOeval's matching and
accumulation in C++ and gives the same numbers (tests/test_evaluation.py checks that the
stats, the per-class AP and the precision array agree to 1e-9).
"""
from __future__ import annotations

import contextlib
import functools
import io
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detfocal.data.subset import load_coco_annotations

__all__ = ["BACKENDS", "CocoSource", "backend_classes", "load_coco", "load_detections", "quiet", "resolve_backend"]

# The values of eval.backend; "auto" is faster_coco_eval when it imports, else pycocotools.
BACKENDS = ("auto", "pycocotools", "faster_coco_eval")

# Ground truth: a COCO object of either backend, a json path or a COCO dict.
CocoSource = COCO | str | Path | Mapping[str, Any]


def quiet() -> contextlib.AbstractContextManager:
    """A context catching stdout: pycocotools prints progress there; keep it out of the logs."""
    return contextlib.redirect_stdout(io.StringIO())


def _to_stdout(*args: Any) -> None:
    """faster-coco-eval's print_function (its default is its own logger): the current stdout, where
    quiet() catches it as it catches pycocotools' output. Not ``print`` itself: given ``print``,
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


def backend_classes(backend: str) -> tuple[type, Callable[..., Any]]:
    """(COCO class, COCOeval constructor) of a resolved backend.

    Args:
        backend: "pycocotools" or "faster_coco_eval", as :func:`resolve_backend` returns.

    Returns:
        The backend's ``COCO`` class and a ``COCOeval`` constructor (faster-coco-eval's prints
        to the current stdout, so :func:`quiet` catches it).
    """
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
    coco_class, _ = backend_classes(resolve_backend(backend))
    if isinstance(coco_gt, coco_class):
        return coco_gt
    coco = coco_class()
    # Both backends' COCO objects have loadRes; paths and dicts do not.
    coco.dataset = coco_gt.dataset if hasattr(coco_gt, "loadRes") else load_coco_annotations(coco_gt)
    with quiet():
        coco.createIndex()
    return coco


def load_detections(coco_gt: Any, results: list[dict[str, Any]]) -> Any:
    """``coco_gt.loadRes(results)``, also for zero detections (pycocotools' loadRes indexes results[0]).

    Args:
        coco_gt: the ground truth, a COCO object of either backend (:func:`load_coco`).
        results: a COCO results list, ``[{"image_id", "category_id", "bbox", "score"}]``.

    Returns:
        A COCO object of the same backend holding the detections.

    Raises:
        ValueError: a detection names an image or a category missing from the ground truth.
    """
    unknown_images = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
    if unknown_images:
        raise ValueError(f"results: {len(unknown_images)} image ids are not in the ground truth, "
                         f"e.g. {sorted(unknown_images)[:5]}")
    unknown_categories = {r["category_id"] for r in results} - set(coco_gt.getCatIds())
    if unknown_categories:
        raise ValueError(f"results: category ids {sorted(unknown_categories)[:10]} are not in the ground truth "
                         f"(known: {coco_gt.getCatIds()}); is a contiguous label being used as a category id?")
    if results:
        with quiet():
            return coco_gt.loadRes(results)
    empty = type(coco_gt)()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                     "annotations": []}
    with quiet():
        empty.createIndex()
    return empty
