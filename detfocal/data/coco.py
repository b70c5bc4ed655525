"""COCO detection dataset that yields torchvision-detection targets with contiguous labels."""
from __future__ import annotations

import contextlib
import io
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.datasets.vision import VisionDataset
from torchvision.transforms.v2 import functional as F

from detfocal.data.images import ImageLoadError, ImageNotFoundError, UndecodableImageError, decode_image_file
from detfocal.data.subset import AnnotationSource, describe_source, load_coco_annotations, make_subset

logger = logging.getLogger(__name__)


class CocoDetection(torchvision.datasets.CocoDetection):
    """COCO instances as ``(image, target)`` pairs for torchvision's detection models.

    Category ids (which may have gaps, e.g. 1..90) map to contiguous labels in
    [0, num_classes), in increasing id order; ``num_classes`` itself means background.

    Each item is ``(image, target)``:
        - image: float32 tensor [3, H, W] in [0, 1] (grayscale, RGBA and palette files become RGB).
        - target["boxes"]: float32 [M, 4], xyxy in pixels of the (transformed) image.
        - target["labels"]: int64 [M], contiguous labels.
        - target["iscrowd"]: int64 [M]; crowd boxes stay in so the head can ignore their anchors.
        - target["image_id"]: int, the COCO image id.
        - target["orig_size"]: int64 [2], (H, W) of the file before transforms.

    Boxes are clamped to the image; those with width or height <= 0 afterwards are dropped,
    with one logged warning that counts them.

    Args:
        images_dir: folder that the images' ``file_name`` entries are relative to.
        annotation_file: path to a COCO instances json, or a loaded COCO dict (used as is, not
            copied, unless a filter applies).
        transforms: callable ``(image, target) -> (image, target)`` on tv_tensors, such as
            ``build_transforms(train=True)``. It receives a uint8 ``tv_tensors.Image`` and
            ``BoundingBoxes``; a uint8 result is scaled to float [0, 1] afterwards.
        categories: category names or ids to keep (see ``make_subset``); None keeps all.
        max_images: keep at most this many images, sampled by ``seed``; None keeps all.
        keep_empty: keep images without non-crowd boxes (negatives). When False they are
            skipped, with one logged warning that counts them, and removed from ``coco`` too.
        seed: seed of the ``max_images`` sampling.
        skip_bad_images: when an image file is missing or cannot be decoded (empty, not an
            image, truncated, above PIL's pixel limit, or not the size the annotations say),
            return the next good image in dataset order instead of raising, so batches keep
            their size; the file is recorded in ``bad_images`` and logged once as a warning,
            with the count so far.
            An image may then appear twice in an epoch. With DataLoader workers each worker
            holds its own copy of the dataset, so ``bad_images`` of the main process only
            counts what was loaded there (with ``num_workers=0``, everything).

    Attributes:
        coco: the pycocotools COCO object of the loaded (possibly filtered) annotations; use it
            as the evaluator's ground truth.
        label_to_category_id: list, ``label_to_category_id[label]`` is the COCO category id.
        category_id_to_label: dict, the inverse mapping.
        category_names: list of names, indexed by label.
        num_classes: number of foreground classes.
        bad_images: sorted file names of the images skipped so far (``skip_bad_images=True``).
        num_bad_images: their count.

    Raises:
        FileNotFoundError: the annotation file or ``images_dir`` does not exist; at item time, an
            image file is missing (``ImageNotFoundError``; the message names the file and the
            annotation file).
        ValueError: ``annotation_file`` is neither a path nor a dict, the annotations are
            malformed or reference an unknown image or category, or no image or no category is
            left (after the filters); at item time, an image cannot be decoded
            (``ImageLoadError``), on one line:
            ``image <file_name> (id N) in <images_dir> cannot be decoded: <reason>``; with
            ``skip_bad_images``, only when no image of the dataset can be loaded. The item-time
            errors keep their one-line message when a DataLoader worker raised them.

    Example:
        >>> dataset = CocoDetection("shapes/val", "shapes/annotations/instances_val.json")
        >>> image, target = dataset[0]
        >>> dataset.label_to_category_id[int(target["labels"][0])]
        3
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotation_file: AnnotationSource,
        transforms: Callable[[Any, Any], tuple[Any, Any]] | None = None,
        categories: Sequence[str | int] | None = None,
        max_images: int | None = None,
        keep_empty: bool = True,
        seed: int = 0,
        skip_bad_images: bool = False,
    ) -> None:
        self.source = describe_source(annotation_file)
        # torchvision's constructor only accepts a path, so the base class is skipped and the
        # same attributes (root, transforms, coco, ids) are set here.
        VisionDataset.__init__(self, root=str(images_dir), transforms=transforms)
        if not Path(images_dir).is_dir():
            raise FileNotFoundError(f"images_dir: {images_dir} is not a directory (annotations: {self.source})")

        dataset = load_coco_annotations(annotation_file)
        if categories is not None or max_images is not None:
            dataset = make_subset(dataset, categories=categories, max_images=max_images, seed=seed)
        self.label_to_category_id: list[int] = sorted(category["id"] for category in dataset["categories"])
        self.category_id_to_label = {category_id: label for label, category_id in enumerate(self.label_to_category_id)}
        names = {category["id"]: category["name"] for category in dataset["categories"]}
        self.category_names: list[str] = [names[category_id] for category_id in self.label_to_category_id]

        self._targets = self._build_targets(dataset)
        if not keep_empty:
            nonempty = [image_id for image_id, (_, _, iscrowd) in self._targets.items() if (iscrowd == 0).any()]
            skipped = len(self._targets) - len(nonempty)
            if skipped:
                logger.warning("CocoDetection: skipped %d images without non-crowd boxes in %s (keep_empty=False)",
                               skipped, self.source)
                dataset = make_subset(dataset, image_ids=nonempty)
                self._targets = {image_id: self._targets[image_id] for image_id in nonempty}

        self.coco = COCO()
        self.coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
            self.coco.createIndex()
        self.ids = sorted(self.coco.imgs)
        if not self.ids or not self.label_to_category_id:
            # An empty split would only fail later, mid-training, far from its cause.
            what = "no images" if not self.ids else "no categories"
            filters = [f"{name}={value!r}" for name, value in (("categories", categories), ("max_images", max_images),
                                                               ("keep_empty", keep_empty))
                       if value is not None and not (name == "keep_empty" and value)]
            after = f" (after {', '.join(filters)})" if filters else ""
            raise ValueError(f"annotation_file: {self.source} lists {what}{after}; expected at least one")
        self.skip_bad_images = skip_bad_images
        self._bad_images: dict[int, str] = {}  # image id -> file name, of the files skipped

    @property
    def num_classes(self) -> int:
        """Number of foreground classes."""
        return len(self.label_to_category_id)

    @property
    def bad_images(self) -> list[str]:
        """File names of the images skipped so far, sorted (see ``skip_bad_images``)."""
        return sorted(self._bad_images.values())

    @property
    def num_bad_images(self) -> int:
        """How many images were skipped so far (see ``skip_bad_images``)."""
        return len(self._bad_images)

    def _build_targets(self, dataset: dict[str, Any]) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Convert every image's annotations once, so degenerate boxes are counted in one warning."""
        per_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for ann in dataset["annotations"]:
            per_image[ann["image_id"]].append(ann)
        targets = {}
        num_dropped = 0
        for image in dataset["images"]:
            if "file_name" not in image:
                raise ValueError(f"annotation_file: {self.source}: image id {image['id']} has no 'file_name'")
            anns = per_image.get(image["id"], [])
            boxes = np.array([ann["bbox"] for ann in anns], dtype=np.float64).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]  # (x, y, w, h) -> (x1, y1, x2, y2)
            if "width" in image and "height" in image:
                boxes[:, 0::2] = boxes[:, 0::2].clip(0, image["width"])
                boxes[:, 1::2] = boxes[:, 1::2].clip(0, image["height"])
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            num_dropped += int((~keep).sum())
            labels = np.array([self.category_id_to_label[ann["category_id"]] for ann in anns], dtype=np.int64)
            iscrowd = np.array([int(ann.get("iscrowd", 0)) for ann in anns], dtype=np.int64)
            targets[image["id"]] = (boxes[keep].astype(np.float32), labels[keep], iscrowd[keep])
        if num_dropped:
            logger.warning("CocoDetection: dropped %d degenerate boxes (width or height <= 0 after clamping to "
                           "the image) from %s", num_dropped, self.source)
        return targets

    def _load_image(self, image_id: int) -> torch.Tensor:
        """The image as uint8 [3, H, W]; raises ImageNotFoundError or ImageLoadError, on one line."""
        info = self.coco.imgs[image_id]
        path = os.path.join(self.root, info["file_name"])
        if not os.path.isfile(path):
            raise ImageNotFoundError(f"image file {path} (image id {image_id}) listed in {self.source} does not exist")
        try:
            image = decode_image_file(path)
        except UndecodableImageError as exc:
            raise ImageLoadError(f"image {info['file_name']} (id {image_id}) in {self.root} cannot be decoded: "
                                 f"{exc.reason}") from None
        if image.dtype != torch.uint8:
            # 16-bit files: the transforms expect uint8, as from every other file.
            image = F.to_dtype(image, torch.uint8, scale=True)
        height, width = image.shape[-2:]
        if "width" in info and "height" in info and (width, height) != (info["width"], info["height"]):
            raise ImageLoadError(f"image file {path} is {width}x{height} but {self.source} "
                                 f"says {info['width']}x{info['height']}; its boxes would not match")
        return image

    def _load_good_image(self, index: int) -> tuple[int, torch.Tensor]:
        """``(image_id, image)`` of item ``index``, or with ``skip_bad_images`` of the first
        loadable item from ``index`` on (wrapping around), so the choice depends only on ``index``."""
        image_id = self.ids[index]  # an IndexError here ends iteration, as for any dataset
        if not self.skip_bad_images:
            return image_id, self._load_image(image_id)
        for offset in range(len(self.ids)):
            image_id = self.ids[(index + offset) % len(self.ids)]
            if image_id in self._bad_images:
                continue
            try:
                return image_id, self._load_image(image_id)
            except (FileNotFoundError, ValueError) as exc:
                self._bad_images[image_id] = self.coco.imgs[image_id]["file_name"]
                logger.warning("skipping a bad image (%d so far, skip_bad_images=True): %s", len(self._bad_images), exc)
        raise ValueError(f"images_dir: none of the {len(self.ids)} images listed in {self.source} can be loaded "
                         f"from {self.root} (skip_bad_images=True skipped them all)")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id, uint8_image = self._load_good_image(index)
        height, width = uint8_image.shape[-2:]
        boxes, labels, iscrowd = self._targets[image_id]
        image: Any = tv_tensors.Image(uint8_image)
        target: dict[str, Any] = {
            # BoundingBoxes so that v2 transforms move the boxes with the image.
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes.copy()), format="XYXY", canvas_size=(height, width)),
            "labels": torch.from_numpy(labels.copy()),
            "iscrowd": torch.from_numpy(iscrowd.copy()),
            "image_id": int(image_id),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        if not torch.is_floating_point(image):
            image = F.to_dtype(image, torch.float32, scale=True)
        # Plain tensors from here on: the model does arithmetic on them and needs no metadata.
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor).to(torch.float32)
        return image.as_subclass(torch.Tensor), target

    def __len__(self) -> int:
        return len(self.ids)


def collate_fn(batch: Sequence[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """Collate detection items into ``(images, targets)`` lists; sizes differ, so no stacking.

    Args:
        batch: sequence of ``(image, target)`` items.

    Returns:
        ``(list of images, list of targets)``.
    """
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets
