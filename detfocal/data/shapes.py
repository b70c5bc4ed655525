"""The embedded default dataset: coloured geometric shapes on cluttered backgrounds, in COCO format.

Class is shape, never colour: fills are saturated colours drawn independently of the class.
Category ids are deliberately non-contiguous and "star" is deliberately rare, so the label
mapping and the per-class metrics are exercised. Every image has its own random generator
seeded by (seed, split, index), so the output is byte-identical across runs.
"""
from __future__ import annotations

import colorsys
import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from detfocal.utils.io import write_json_atomic

# (category id, name, share of objects). The ids have gaps on purpose.
CATEGORIES: tuple[tuple[int, str, float], ...] = (
    (1, "circle", 0.2375),
    (3, "square", 0.2375),
    (7, "triangle", 0.2375),
    (12, "star", 0.05),
    (20, "ring", 0.2375),
)
# Bump when the drawing changes, so that `generate` does not reuse stale files.
GENERATOR_VERSION = 1
EMPTY_IMAGE_FRACTION = 0.05
# An object may lose at most this share of its pixels to objects drawn over it; placements
# that would hide more are re-drawn elsewhere, so every annotated object stays recognisable.
MAX_OCCLUDED_FRACTION = 0.4
_PLACEMENT_TRIES = 10
_SPLITS = ("train", "val")
# Written first into every folder `generate` creates: only such a folder (or an empty or new
# one) is ever written into, so a mistyped root cannot scatter files through a user's folder.
MARKER_FILE = "detfocal_shapes.json"
# Fixed writer settings: PIL writes no timestamp chunk, so equal pixels give equal bytes.
_PNG_OPTIONS = {"format": "PNG", "compress_level": 1, "optimize": False}
# Upper bounds of `generate`'s parameters (the config's data.shapes has the same ones): far above
# any use of a toy dataset, and low enough that a typo cannot start hours of work or allocate
# gigabytes per image before failing.
MAX_IMAGES = 100_000
MAX_IMAGE_SIZE = 4096
MAX_OBJECTS = 100
SEED_LIMIT = 2 ** 32


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth, muted colour noise plus thin random lines: clutter that looks like no shape."""
    coarse = rng.uniform(50, 200, size=(4, 4, 3))
    coarse = 0.5 * coarse + 0.5 * coarse.mean(axis=2, keepdims=True)  # desaturate so shapes stand out
    smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BICUBIC), dtype=np.int16)
    grain = rng.integers(-10, 11, size=(size, size, 1), dtype=np.int16)
    image = Image.fromarray((smooth + grain).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        points = [tuple(p) for p in rng.uniform(0, size, size=(2, 2)).tolist()]
        colour = tuple(int(c) for c in rng.integers(30, 226, size=3))
        draw.line(points, fill=colour, width=int(rng.integers(1, 3)))
    return image


def _polygon(cx: float, cy: float, radius: float, corners: int, angle: float, inner: float | None = None) -> list[tuple[float, float]]:
    """Vertices of a regular polygon, or of a star when ``inner`` (inner/outer radius) is set."""
    steps = corners * 2 if inner is not None else corners
    points = []
    for k in range(steps):
        r = radius * (inner if inner is not None and k % 2 else 1.0)
        theta = angle + 2 * math.pi * k / steps
        points.append((cx + r * math.cos(theta), cy + r * math.sin(theta)))
    return points


def _draw_shape(mask: Image.Image, name: str, cx: float, cy: float, radius: float, angle: float) -> None:
    """Draw one filled shape (value 255) into an "L" mask; ``radius`` is the circumradius."""
    draw = ImageDraw.Draw(mask)
    disc = [cx - radius, cy - radius, cx + radius, cy + radius]
    if name == "circle":
        draw.ellipse(disc, fill=255)
    elif name == "ring":
        hole = 0.55 * radius
        draw.ellipse(disc, fill=255)
        draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=0)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, radius, 4, angle), fill=255)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, radius, 3, angle), fill=255)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, radius, 5, angle, inner=0.45), fill=255)
    else:
        raise ValueError(f"name: unknown shape {name!r}")


def _saturated_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    red, green, blue = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0))
    return int(255 * red), int(255 * green), int(255 * blue)


def render_image(rng: np.random.Generator, image_size: int, max_objects: int, min_object_size: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Draw one image of the shapes dataset.

    Args:
        rng: the image's own generator; the same state gives the same image.
        image_size: width and height in pixels.
        max_objects: most objects; the count is uniform in [1, max_objects], or 0 for ~5% of images.
        min_object_size: smallest object diameter in pixels; the largest is ``image_size / 2``.

    Returns:
        The RGB image and its objects as ``{"bbox": [x, y, w, h] of the visible pixels,
        "area": visible pixel count, "category_id"}``, in drawing order (later ones on top).
    """
    image = _background(rng, image_size)
    num_objects = 0 if rng.uniform() < EMPTY_IMAGE_FRACTION else int(rng.integers(1, max_objects + 1))
    shares = np.array([share for _, _, share in CATEGORIES])
    # owner[y, x] = 1 + index of the object visible at that pixel, 0 for background.
    owner = np.zeros((image_size, image_size), dtype=np.int32)
    full_area: list[int] = []
    categories: list[int] = []
    extents: list[tuple[int, int, int, int]] = []
    max_size = image_size / 2
    for _ in range(num_objects):
        category_id, name, _ = CATEGORIES[int(rng.choice(len(CATEGORIES), p=shares))]
        # Log-uniform sizes: as many small objects as large ones, per octave.
        radius = 0.5 * math.exp(rng.uniform(math.log(min_object_size), math.log(max_size)))
        angle = rng.uniform(0, 2 * math.pi)
        colour = _saturated_colour(rng)
        visible = np.bincount(owner.ravel(), minlength=len(full_area) + 1)[1:]
        for _ in range(_PLACEMENT_TRIES):
            cx, cy = rng.uniform(radius, image_size - radius, size=2)
            mask_image = Image.new("L", (image_size, image_size), 0)
            _draw_shape(mask_image, name, cx, cy, radius, angle)
            mask = np.asarray(mask_image) > 0
            area = int(mask.sum())
            if area == 0:
                continue
            # Pixels each existing object would lose under the new one.
            lost = np.bincount(owner[mask], minlength=len(full_area) + 1)[1:]
            if np.all(visible - lost >= (1 - MAX_OCCLUDED_FRACTION) * np.array(full_area, dtype=np.int64)):
                break
        else:
            continue  # no placement leaves the others visible enough; skip this object
        owner[mask] = len(full_area) + 1
        full_area.append(area)
        categories.append(category_id)
        extent = mask_image.getbbox()  # (left, top, right, bottom); work inside it only, for speed
        extents.append(extent)
        image.paste(colour, box=extent, mask=mask_image.crop(extent))

    objects = []
    for index, (category_id, (left, top, right, bottom)) in enumerate(zip(categories, extents)):
        ys, xs = np.nonzero(owner[top:bottom, left:right] == index + 1)
        x0, y0, x1, y1 = left + int(xs.min()), top + int(ys.min()), left + int(xs.max()) + 1, top + int(ys.max()) + 1
        objects.append({"bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(len(xs)), "category_id": category_id})
    return image, objects


def _read_json_dict(path: Path) -> dict[str, Any] | None:
    """The json object in ``path``, or None when it is missing, unreadable or not an object."""
    try:
        with path.open("r", encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return content if isinstance(content, dict) else None


def _is_complete(json_path: Path, images_dir: Path, params: dict[str, Any]) -> bool:
    """True when ``json_path`` was written with ``params`` and all its images exist."""
    dataset = _read_json_dict(json_path)
    if dataset is None or not isinstance(dataset.get("info"), dict) or dataset["info"].get("detfocal_shapes") != params:
        return False
    images = dataset.get("images")
    if not isinstance(images, list) or not all(isinstance(image, dict) and isinstance(image.get("file_name"), str)
                                               for image in images):
        return False
    return all((images_dir / image["file_name"]).is_file() for image in images)


def _made_by_us(out_dir: Path) -> bool:
    """True when ``out_dir`` holds our marker, or a json of ours from before the marker existed."""
    marker = _read_json_dict(out_dir / MARKER_FILE)
    if marker is not None and marker.get("generator") == "detfocal.data.shapes":
        return True
    for split in _SPLITS:
        dataset = _read_json_dict(out_dir / "annotations" / f"instances_{split}.json")
        if dataset is not None and isinstance(dataset.get("info"), dict) and "detfocal_shapes" in dataset["info"]:
            return True
    return False


def _claim_folder(out_dir: Path) -> None:
    """Create ``out_dir`` and mark it as ours, or raise if it is someone else's folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir: {out_dir} is a file; expected a folder for the shapes dataset")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _made_by_us(out_dir):
        raise ValueError(f"out_dir: {out_dir} is a non-empty folder that holds no shapes dataset (no {MARKER_FILE}); "
                         f"expected a new or empty folder, or one made by detfocal.data.shapes.generate")
    if not (out_dir / MARKER_FILE).is_file():
        write_json_atomic(out_dir / MARKER_FILE, {"generator": "detfocal.data.shapes"})


def _generate_split(out_dir: Path, split: str, params: dict[str, Any], progress: bool) -> None:
    images_dir = out_dir / split
    images_dir.mkdir(parents=True, exist_ok=True)
    # The json goes first and comes back last: a generation killed halfway leaves a split without
    # annotations (regenerated next time), never old annotations over new images.
    (out_dir / "annotations" / f"instances_{split}.json").unlink(missing_ok=True)
    images, annotations = [], []
    split_code = _SPLITS.index(split)
    for index in tqdm(range(params["num_images"]), desc=f"shapes {split}", disable=not progress):
        rng = np.random.default_rng([params["seed"], split_code, index])
        image, objects = render_image(rng, params["image_size"], params["max_objects"], params["min_object_size"])
        image_id = index + 1  # COCO ids start at 1
        file_name = f"{image_id:06d}.png"
        image.save(images_dir / file_name, **_PNG_OPTIONS)
        images.append({"id": image_id, "file_name": file_name, "width": params["image_size"], "height": params["image_size"]})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **obj})
    payload = {
        # No date: two runs must write identical bytes.
        "info": {"description": f"detfocal shapes, {split} split", "detfocal_shapes": params},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _ in CATEGORIES],
    }
    write_json_atomic(out_dir / "annotations" / f"instances_{split}.json", payload)


def generate(
    out_dir: str | Path,
    num_train: int = 1500,
    num_val: int = 200,
    image_size: int = 128,
    seed: int = 0,
    max_objects: int = 6,
    min_object_size: int = 8,
    progress: bool = False,
) -> dict[str, Path]:
    """Write the shapes dataset (PNG images + COCO json), or reuse it if it is already there.

    Layout: ``out_dir/{train,val}/NNNNNN.png``, ``out_dir/annotations/instances_{train,val}.json``
    and the marker ``out_dir/detfocal_shapes.json``; ``out_dir`` must be new, empty, or made by
    ``generate`` before. The parameters are stored in each json's
    ``info["detfocal_shapes"]``; a split whose json has the same parameters and whose images all
    exist is not regenerated. Objects are 5 shapes (ids 1, 3, 7, 12, 20; "star" is ~5% of objects),
    sized from ``min_object_size`` to ``image_size / 2`` px, up to ``max_objects`` per image,
    at most 40% occluded; about 5% of images are empty.

    Args:
        out_dir: output folder.
        num_train: number of training images, 0 to :data:`MAX_IMAGES` (100,000).
        num_val: number of validation images, 0 to :data:`MAX_IMAGES`.
        image_size: width and height of the square images, in pixels, 32 to :data:`MAX_IMAGE_SIZE` (4096).
        seed: in [0, 2**32); the same seed and parameters give byte-identical files.
        max_objects: most objects per image, 1 to :data:`MAX_OBJECTS` (100).
        min_object_size: smallest object diameter in pixels, 4 to ``image_size / 2``.
        progress: show a tqdm progress bar.

    Returns:
        Paths: ``train_images``, ``train_annotations``, ``val_images``, ``val_annotations``.

    Raises:
        ValueError: a count, size or the seed is not an int in its range (checked before any
            file is written; the message names the parameter, the value and the range), or
            ``out_dir`` is a file or a non-empty folder that ``generate`` did not make (it marks
            its folders with ``MARKER_FILE``).

    Example:
        >>> paths = generate("data/shapes", num_train=100, num_val=20)
        >>> dataset = CocoDetection(paths["val_images"], paths["val_annotations"])
    """
    for name, value, low, high in (("num_train", num_train, 0, MAX_IMAGES), ("num_val", num_val, 0, MAX_IMAGES),
                                   ("image_size", image_size, 32, MAX_IMAGE_SIZE),
                                   ("max_objects", max_objects, 1, MAX_OBJECTS),
                                   ("min_object_size", min_object_size, 4, MAX_IMAGE_SIZE // 2),
                                   ("seed", seed, 0, SEED_LIMIT - 1)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name}: expected an int in [{low}, {high}], got {value!r:.40}")
    if 2 * min_object_size > image_size:
        raise ValueError(f"min_object_size: expected at most image_size / 2 = {image_size // 2}, got {min_object_size}")

    out_dir = Path(out_dir)
    _claim_folder(out_dir)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    with _generation_lock(out_dir):  # two jobs sharing the folder generate one after the other
        for split, num_images in (("train", num_train), ("val", num_val)):
            params = {"generator_version": GENERATOR_VERSION, "split": split, "num_images": num_images,
                      "image_size": image_size, "seed": seed, "max_objects": max_objects,
                      "min_object_size": min_object_size}
            json_path = out_dir / "annotations" / f"instances_{split}.json"
            if not _is_complete(json_path, out_dir / split, params):
                _generate_split(out_dir, split, params, progress)
            paths[f"{split}_images"] = out_dir / split
            paths[f"{split}_annotations"] = json_path
    return paths


@contextlib.contextmanager
def _generation_lock(out_dir: Path) -> Iterator[None]:
    """An advisory lock on ``out_dir`` while a process checks and (re)generates its splits."""
    import fcntl

    descriptor = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def ensure_dataset(root: str | Path, **params: Any) -> dict[str, Path]:
    """Make sure the shapes dataset of ``params`` is at ``root``: generate what is missing or different.

    The data stage's half of a config's ``data.shapes`` section (the config only computes the
    paths): call it as ``ensure_dataset(**shapes_kwargs(cfg))`` on one process, before any
    process reads the data. A split already there with the same parameters is kept as is.

    Args:
        root: the dataset's folder (``data.shapes.root``).
        **params: the other ``generate`` parameters; missing ones take its defaults.

    Returns:
        Paths: ``train_images``, ``train_annotations``, ``val_images``, ``val_annotations``.

    Raises:
        ValueError: a parameter is out of range, or ``root`` is a file or a folder that
            ``generate`` did not make.

    Example:
        >>> paths = ensure_dataset("data/shapes", num_train=100, num_val=20)
    """
    return generate(root, **params)
