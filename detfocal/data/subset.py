"""Load, validate and subset COCO annotation dicts, keeping the original ids."""
from __future__ import annotations

import difflib
import json
import math
import os
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

AnnotationSource = str | Path | Mapping[str, Any]

# Keys each entry must carry for pycocotools to index it and for us to build targets.
_REQUIRED_KEYS = {
    "images": ("id",),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


# faster-coco-eval holds image and category ids as doubles, and so do the evaluator's result
# arrays: above 2**53 neighbouring ids become one double and their boxes mix.
MAX_ID = 2 ** 53
# Box coordinates beyond this make box areas overflow float32 (the targets' dtype) on the way
# to the loss; no image is anywhere near this many pixels wide.
MAX_COORDINATE = 1e18


# Exact type tests (json gives plain int and float): they keep bool out.
def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_id(value: Any) -> bool:
    return type(value) is int and -MAX_ID < value < MAX_ID


def _is_annotation_id(value: Any) -> bool:
    # COCOeval records a detection's match as the annotation's id and "no match" as 0, so id 0
    # never counts as matched; faster-coco-eval mis-scores negative ids too.
    return type(value) is int and 0 < value < MAX_ID


def _is_number(value: Any) -> bool:
    return (type(value) is float or type(value) is int) and math.isfinite(value)


def _is_box(value: Any) -> bool:
    return (type(value) is list or type(value) is tuple) and len(value) == 4 and all(map(_is_number, value))


def _box_fits(box: Sequence[float]) -> bool:
    x, y, w, h = box
    return max(abs(x), abs(y), abs(x + w), abs(y + h)) <= MAX_COORDINATE


# (field, check, what was expected) of each entry, checked when the field is present. Wrong types
# would otherwise surface mid-epoch as a TypeError deep inside pycocotools or numpy.
_FIELD_TYPES: dict[str, tuple[tuple[str, Callable[[Any], bool], str], ...]] = {
    "images": (("id", _is_id, f"an int of magnitude below 2**53 = {MAX_ID}"),
               ("file_name", lambda v: isinstance(v, str) and v != "", "a non-empty string"),
               ("width", lambda v: _is_number(v) and v > 0, "a positive number"),
               ("height", lambda v: _is_number(v) and v > 0, "a positive number")),
    "annotations": (("id", _is_annotation_id, f"an int in [1, 2**53 = {MAX_ID})"),
                    ("image_id", _is_int, "an int"),
                    ("category_id", _is_int, "an int"),
                    ("bbox", _is_box, "[x, y, w, h], four finite numbers"),
                    ("iscrowd", lambda v: isinstance(v, int) and v in (0, 1), "0 or 1"),
                    ("area", _is_number, "a finite number")),
    "categories": (("id", _is_id, f"an int of magnitude below 2**53 = {MAX_ID}"),
                   ("name", lambda v: isinstance(v, str), "a string")),
}


def describe_source(annotation_file: AnnotationSource) -> str:
    """Name an annotation source for error messages: its path, ``<annotation dict>``, or ``<TYPE>``."""
    if isinstance(annotation_file, Mapping):
        return "<annotation dict>"
    if isinstance(annotation_file, (str, os.PathLike)):
        return str(annotation_file)
    return f"<{type(annotation_file).__name__}>"


def load_coco_annotations(annotation_file: AnnotationSource) -> dict[str, Any]:
    """Load a COCO annotation file (or take a loaded dict) and check that it is consistent.

    Args:
        annotation_file: path to a COCO instances json, or the already-loaded dict. A dict is
            returned as is, not copied.

    Returns:
        The COCO dict, with "images", "annotations" and "categories" lists.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: ``annotation_file`` is neither a path nor a dict, the json is not valid, a
            top-level list or a required key of an entry is missing, a value is out of range
            (see ``validate_coco_annotations``), ids are duplicated, or an annotation references
            an unknown image or category.
    """
    source = describe_source(annotation_file)
    if isinstance(annotation_file, Mapping):
        dataset = annotation_file
    elif not isinstance(annotation_file, (str, os.PathLike)):
        raise ValueError(f"annotation_file: expected a path to a COCO json or a COCO dict, "
                         f"got a {type(annotation_file).__name__}")
    else:
        path = Path(annotation_file)
        if not path.is_file():
            raise FileNotFoundError(f"annotation_file: {source} does not exist or is not a file")
        try:
            with path.open("r", encoding="utf-8") as handle:
                dataset = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ValueError(f"annotation_file: {source} is not valid UTF-8 json ({type(exc).__name__}: {exc})") from None
    if not isinstance(dataset, Mapping):
        raise ValueError(f"annotation_file: {source} holds a {type(dataset).__name__}, expected a COCO dict")
    validate_coco_annotations(dataset, source)
    return dataset  # type: ignore[return-value]


def validate_coco_annotations(dataset: Mapping[str, Any], source: str = "<annotation dict>") -> None:
    """Raise a ValueError naming the first problem in a COCO dict (see ``load_coco_annotations``).

    Checks the three lists, the keys each entry needs, the types of the fields that are
    present (ids are ints, ``bbox`` is four finite numbers, ``iscrowd`` is 0 or 1,
    ``width``/``height`` are positive numbers, ``file_name`` is a non-empty string), unique ids,
    and that annotations reference known images and categories. Image and category ids must
    have a magnitude below 2**53 (:data:`MAX_ID`) and annotation ids lie in [1, 2**53):
    faster-coco-eval holds ids as doubles and COCOeval takes annotation id 0 for "unmatched".
    Box corners must lie within :data:`MAX_COORDINATE` pixels, so float32 targets stay finite.

    Args:
        dataset: the COCO dict.
        source: how error messages name it (its path).

    Raises:
        ValueError: one line naming the list, the entry's index, the field and its value,
            e.g. ``annotations[0]['id'] is [1, 2], expected an int``.
    """
    for key, required in _REQUIRED_KEYS.items():
        if key not in dataset:
            raise ValueError(f"annotation_file: {source} has no {key!r} list (found keys {sorted(dataset)})")
        if not isinstance(dataset[key], list):
            raise ValueError(f"annotation_file: {source}: {key!r} is a {type(dataset[key]).__name__}, expected a list")
        entries = dataset[key]
        for index, entry in enumerate(entries):
            missing = [name for name in required if not isinstance(entry, Mapping) or name not in entry]
            if missing:
                raise ValueError(f"annotation_file: {source}: {key}[{index}] has no {missing} (entry: {entry!r:.200})")
        for field, check, expected in _FIELD_TYPES[key]:
            # One pass per field over the values; the entry's index is only looked up on failure.
            if all(map(check, (entry[field] for entry in entries if field in entry))):
                continue
            index = next(i for i, entry in enumerate(entries) if field in entry and not check(entry[field]))
            raise ValueError(f"annotation_file: {source}: {key}[{index}][{field!r}] is {entries[index][field]!r:.100}, "
                             f"expected {expected}")
        duplicates = [i for i, n in Counter(entry["id"] for entry in dataset[key]).items() if n > 1]
        if duplicates:
            raise ValueError(f"annotation_file: {source}: {len(duplicates)} duplicated ids in {key!r}, e.g. {duplicates[:5]}")

    # Four finite numbers can still overflow the float32 targets, e.g. [0, 0, 1e300, 1e300].
    annotations = dataset["annotations"]
    if not all(map(_box_fits, (ann["bbox"] for ann in annotations))):
        index = next(i for i, ann in enumerate(annotations) if not _box_fits(ann["bbox"]))
        ann = annotations[index]
        raise ValueError(f"annotation_file: {source}: annotation id {ann['id']} (annotations[{index}]) has bbox "
                         f"{ann['bbox']!r:.100}, with a corner beyond {MAX_COORDINATE:g} pixels, where float32 "
                         f"box areas overflow; expected [x, y, w, h] in pixels")

    image_ids = {image["id"] for image in dataset["images"]}
    category_ids = {category["id"] for category in dataset["categories"]}
    for field, known, where in (("image_id", image_ids, "images"), ("category_id", category_ids, "categories")):
        bad = [ann for ann in dataset["annotations"] if ann[field] not in known]
        if bad:
            raise ValueError(
                f"annotation_file: {source}: {len(bad)} annotations reference a {field} that is not in "
                f"{where!r}, e.g. annotation id {bad[0]['id']} has {field} {bad[0][field]!r}"
            )


def resolve_categories(dataset: Mapping[str, Any], categories: Sequence[str | int] | str | int) -> list[int]:
    """Map category names or ids to ids, in the order of the dataset's category list.

    Raises:
        ValueError: a name is unknown (the message lists close matches) or an id is unknown.
    """
    if isinstance(categories, (str, int)):
        categories = [categories]
    if len(categories) == 0:
        raise ValueError("categories: expected at least one name or id, got an empty list (use None to keep all)")
    by_name = {category["name"]: category["id"] for category in dataset["categories"]}
    known_ids = [category["id"] for category in dataset["categories"]]
    wanted: set[int] = set()
    for item in categories:
        if isinstance(item, str):
            if item not in by_name:
                close = difflib.get_close_matches(item, list(by_name), n=5, cutoff=0.6)
                hint = f"close matches: {', '.join(close)}" if close else f"known names: {', '.join(list(by_name)[:20])}"
                raise ValueError(f"categories: unknown category name {item!r}; {hint}")
            wanted.add(by_name[item])
        elif isinstance(item, int) and not isinstance(item, bool):
            if item not in known_ids:
                raise ValueError(f"categories: unknown category id {item}; known ids: {known_ids}")
            wanted.add(item)
        else:
            raise ValueError(f"categories: expected names (str) or ids (int), got {item!r}")
    return [category_id for category_id in known_ids if category_id in wanted]


def make_subset(
    annotation_file: AnnotationSource,
    categories: Sequence[str | int] | None = None,
    max_images: int | None = None,
    image_ids: Sequence[int] | None = None,
    min_annotations: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Return a COCO dict restricted to some categories and images, with the original ids kept.

    Filters apply in this order: categories (annotations of other categories are removed),
    ``image_ids``, ``min_annotations``, then ``max_images``. Images without annotations of the
    kept categories stay unless ``min_annotations`` > 0: they are the negatives.

    Args:
        annotation_file: path to a COCO instances json, or a loaded COCO dict (not modified).
        categories: category names and/or ids to keep; None keeps all.
        max_images: keep at most this many images, sampled with ``random.Random(seed)``; None
            keeps all.
        image_ids: keep only these images; None keeps all.
        min_annotations: keep only images with at least this many non-crowd annotations of the
            kept categories.
        seed: seed of the ``max_images`` sampling; the same seed gives the same subset.

    Returns:
        A new COCO dict with "info" and "licenses" copied through and "images", "annotations"
        and "categories" filtered consistently (no id points outside the dict). The entries are
        new dicts; their nested values (bbox lists, segmentations) are shared with the input.

    Raises:
        FileNotFoundError: the annotation file does not exist.
        ValueError: the annotations are malformed, a category name or id is unknown (names list
            close matches), an image id is unknown, or a count is negative.

    Example:
        >>> sub = make_subset("instances_val2014.json", categories=["person", "dog"], max_images=500)
    """
    dataset = load_coco_annotations(annotation_file)
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 0):
        raise ValueError(f"max_images: expected a non-negative int or None, got {max_images!r}")
    if isinstance(min_annotations, bool) or not isinstance(min_annotations, int) or min_annotations < 0:
        raise ValueError(f"min_annotations: expected a non-negative int, got {min_annotations!r}")

    category_ids = set(resolve_categories(dataset, categories) if categories is not None else
                       (category["id"] for category in dataset["categories"]))
    annotations = [ann for ann in dataset["annotations"] if ann["category_id"] in category_ids]

    kept_ids = [image["id"] for image in dataset["images"]]
    if image_ids is not None:
        known = set(kept_ids)
        unknown = [image_id for image_id in image_ids if image_id not in known]
        if unknown:
            raise ValueError(f"image_ids: {len(unknown)} ids are not in the annotation file, e.g. {unknown[:5]}")
        wanted = set(image_ids)
        kept_ids = [image_id for image_id in kept_ids if image_id in wanted]
    if min_annotations > 0:
        counts = Counter(ann["image_id"] for ann in annotations if not ann.get("iscrowd", 0))
        kept_ids = [image_id for image_id in kept_ids if counts[image_id] >= min_annotations]
    if max_images is not None and max_images < len(kept_ids):
        # Sample from the sorted ids so the subset depends on the seed, not on the file's order.
        sampled = set(random.Random(seed).sample(sorted(kept_ids), max_images))
        kept_ids = [image_id for image_id in kept_ids if image_id in sampled]

    kept = set(kept_ids)
    subset: dict[str, Any] = {}
    for key in ("info", "licenses"):
        if key in dataset:
            subset[key] = dataset[key]
    subset["images"] = [dict(image) for image in dataset["images"] if image["id"] in kept]
    subset["annotations"] = [dict(ann) for ann in annotations if ann["image_id"] in kept]
    subset["categories"] = [dict(category) for category in dataset["categories"] if category["id"] in category_ids]
    return subset


def summarize_subset(dataset: Mapping[str, Any]) -> str:
    """One line: ``N images, M annotations, K categories``."""
    return (f"{len(dataset['images'])} images, {len(dataset['annotations'])} annotations, "
            f"{len(dataset['categories'])} categories")


def check_output_path(out: str | os.PathLike, sources: Iterable[AnnotationSource], argument: str = "--out") -> None:
    """Check, before any work, that a subset can be written to ``out`` without replacing its source.

    Refuses an ``out`` that is one of the input annotation files (compared after resolving
    symlinks and ``..``; when both files exist, ``os.path.samefile`` also catches hard links and
    other aliases), an ``out`` that is a folder, and a folder that cannot be written: a file is
    created and removed in ``out``'s folder (or, when that folder does not exist yet, in its
    nearest existing parent, where the writer will create it). Loaded dicts among ``sources``
    are ignored.

    Args:
        out: the path the subset will be written to.
        sources: the input annotation files.
        argument: how the message names ``out`` (the command-line option).

    Raises:
        ValueError: one line naming ``out``, e.g.
            ``--out in.json is the input annotation file; write the subset elsewhere``,
            ``--out data is a folder, expected a json file path`` or
            ``--out /ro/sub.json cannot be written in /ro: Read-only file system``.

    Example:
        >>> check_output_path(args.out, [args.annotations])
    """
    out_path = Path(out)
    for source in sources:
        if isinstance(source, Mapping):
            continue
        source_path = Path(source)
        same = out_path.resolve() == source_path.resolve()
        if not same and out_path.exists() and source_path.exists():
            same = os.path.samefile(out_path, source_path)
        if same:
            alias = "" if str(out_path) == str(source_path) else f" ({source_path})"
            raise ValueError(f"{argument} {out} is the input annotation file{alias}; write the subset elsewhere")
    if out_path.is_dir():
        raise ValueError(f"{argument} {out} is a folder, expected a json file path")
    folder = out_path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{argument} {out} cannot be written: {folder} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise ValueError(f"{argument} {out} cannot be written in {folder}: {exc.strerror or exc}") from None
