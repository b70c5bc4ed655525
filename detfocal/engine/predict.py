"""Detecting objects in image files and drawing them: :func:`predict_images`, behind ``detfocal infer``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["output_paths", "predict_images"]


def _check_images(paths: Sequence[Path]) -> None:
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise FileNotFoundError(f"image {missing[0]} does not exist" +
                                (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    folders = [str(path) for path in paths if not path.is_file()]
    if folders:
        raise ValueError(f"image {folders[0]} is a folder, expected a PNG or JPEG file" +
                         (f" (and {len(folders) - 1} more)" if len(folders) > 1 else ""))


def _file_id(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def output_paths(images: Sequence[Path], out: Path, *, overwrite: bool = False) -> list[Path]:
    """The drawing of each image: ``out/<stem>.png``, same stems from other folders getting ``_1``, ``_2``, ...

    Checked before any work: a drawing never replaces an input image (whatever
    ``overwrite`` says), and replaces another existing file only with ``overwrite``.

    Args:
        images: the input image files (they exist).
        out: the output folder.
        overwrite: replace existing files that are not inputs (``--overwrite``).

    Returns:
        One path per image, in order.

    Raises:
        ValueError: a drawing would replace an input image, a folder, or (without
            ``overwrite``) an existing file.
    """
    inputs = {_file_id(path): path for path in images}  # device and inode: links and other spellings too
    used: set[str] = set()
    targets = []
    for path in images:
        stem, index = path.stem, 1
        while stem in used:  # same-named inputs from different folders must not overwrite each other
            stem, index = f"{path.stem}_{index}", index + 1
        used.add(stem)
        target = out / f"{stem}.png"
        if target.exists():
            if target.is_dir():
                raise ValueError(f"--out: the drawing of {path} would be {target}, which is a folder")
            replaced = inputs.get(_file_id(target))
            if replaced is not None:
                raise ValueError(f"--out: the drawing of {path} would replace the input image {replaced}; "
                                 f"choose another --out folder")
            if not overwrite:
                raise ValueError(f"--out: {target} exists (the drawing of {path} would replace it); pass "
                                 f"--overwrite to replace it, or choose another --out folder")
        targets.append(target)
    return targets


@torch.no_grad()
def predict_images(checkpoint: str | Path, images: Sequence[str | Path], out_dir: str | Path, *,
                   score_thresh: float = 0.5, min_draw_size: int = 512, overwrite: bool = False
                   ) -> list[dict[str, Any]]:
    """Detect objects in image files and draw them; the function behind ``detfocal infer``.

    Args:
        checkpoint: a training checkpoint.
        images: PNG or JPEG files (8- or 16-bit, grey, palette or colour).
        out_dir: folder for the drawn PNGs (one per input; see :func:`output_paths`).
        score_thresh: lowest score kept, in [0, 1].
        min_draw_size: enlarge smaller images by a whole factor until their longer side reaches
            this many pixels before drawing, so labels stay readable; 0 draws at input size.
        overwrite: replace existing files in ``out_dir`` (never an input image).

    Returns:
        Per image: ``{"image", "output", "boxes", "scores", "labels", "names"}``; boxes
        ``[K, 4]`` (x1, y1, x2, y2) in the image's pixels, scores and labels ``[K]``.

    Raises:
        ValueError: a bad threshold or draw size, an image that is a folder or cannot be
            decoded, a drawing that would replace an input or (without ``overwrite``) an
            existing file, a bad checkpoint.
        FileNotFoundError: an image or the checkpoint does not exist.

    Example:
        >>> results = predict_images("runs/shapes_retinanet_r18/best.pth", ["shape.png"], "drawn")
        >>> results[0]["names"]  # e.g. ["circle", "star"]
    """
    from PIL import Image

    from detfocal.data import load_image
    from detfocal.engine.loading import load_model
    from detfocal.evaluation.draw import MAX_DRAW_SIZE, draw_detections
    from detfocal.utils.io import atomic_write, ensure_writable_dir

    if not 0.0 <= score_thresh <= 1.0:
        raise ValueError(f"--score-thresh: expected a score in [0, 1], got {score_thresh}")
    if not 0 <= min_draw_size <= MAX_DRAW_SIZE:
        raise ValueError(f"--min-draw-size: expected pixels in [0, {MAX_DRAW_SIZE}], got {min_draw_size}")
    paths = [Path(path) for path in images]
    _check_images(paths)
    out = ensure_writable_dir(out_dir, "--out")
    targets = output_paths(paths, out, overwrite=overwrite)
    model, info = load_model(checkpoint, score_thresh=score_thresh)
    device = next(model.parameters()).device
    names = info["category_names"]
    results = []
    for path, target in zip(paths, targets):
        image = load_image(path)  # float [3, H, W] in [0, 1], 8- or 16-bit sources alike
        detections = model([image.to(device)])[0]
        keep = detections["scores"] >= score_thresh
        boxes, scores, labels = (detections[key][keep].cpu() for key in ("boxes", "scores", "labels"))
        drawn = draw_detections(image, boxes, labels, names, scores=scores, min_draw_size=min_draw_size)
        picture = Image.fromarray(drawn.permute(1, 2, 0).numpy())  # [3, H, W] -> [H, W, 3]
        atomic_write(target, lambda handle: picture.save(handle, format="PNG"))
        results.append({"image": path, "output": target, "boxes": boxes, "scores": scores, "labels": labels,
                        "names": [names[label] if label < len(names) else str(label) for label in labels.tolist()]})
    return results
