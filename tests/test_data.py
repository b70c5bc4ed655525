"""detfocal.data: CocoDetection, transforms, make_subset, the shapes generator and their tools."""
from __future__ import annotations

import copy
import io
import json
import logging
import os
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from detfocal.cli import main as cli_main
from detfocal.data import CocoDetection, build_transforms, check_output_path, collate_fn, make_subset, shapes
from detfocal.data.images import load_image, to_uint8

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).resolve().parent / "data" / "instances_val2014_100.json"
SIZE = 64


def _ann(ann_id, image_id, category_id, bbox, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": bbox[2] * bbox[3], "iscrowd": iscrowd}


@pytest.fixture
def tiny(tmp_path):
    """Five 64 px images in several PIL modes, categories {3, 7, 90}, a crowd box, an empty
    image and two degenerate boxes."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(SIZE, SIZE, 4), dtype=np.uint8)
    files = {
        1: Image.fromarray(pixels[..., :3], "RGB"),
        2: Image.fromarray(pixels[..., 0], "L"),
        3: Image.fromarray(pixels, "RGBA"),
        4: Image.fromarray(pixels[..., :3], "RGB").convert("P"),
        5: Image.fromarray(pixels[..., :3], "RGB"),
    }
    for image_id, image in files.items():
        image.save(tmp_path / f"{image_id}.png")
    dataset = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": SIZE, "height": SIZE} for i in files],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}],
        "annotations": [
            _ann(1, 1, 90, [10, 5, 20, 15]),
            _ann(2, 1, 3, [0, 0, 64, 64], iscrowd=1),
            _ann(3, 2, 7, [30, 30, 10, 20]),
            _ann(4, 2, 3, [5, 5, 0, 10]),  # zero width: dropped
            _ann(5, 3, 7, [1, 2, 3, 4]),
            _ann(6, 3, 90, [70, 10, 5, 5]),  # entirely right of the image: empty after clamping
            _ann(7, 4, 3, [2, 3, 40, 50]),
        ],  # image 5 has no annotations
    }
    return tmp_path, dataset


def _dataset(tiny, **kwargs):
    images_dir, dataset = tiny
    return CocoDetection(images_dir, dataset, **kwargs)


def _warnings(caplog):
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


def test_category_ids_map_to_contiguous_labels_and_back(tiny):
    dataset = _dataset(tiny)
    assert dataset.label_to_category_id == [3, 7, 90]
    assert dataset.category_names == ["car", "train", "toothbrush"]
    assert dataset.num_classes == 3
    expected = {1: ([[10, 5, 30, 20], [0, 0, 64, 64]], [90, 3]), 2: ([[30, 30, 40, 50]], [7]),
                3: ([[1, 2, 4, 6]], [7]), 4: ([[2, 3, 42, 53]], [3]), 5: ([], [])}
    for index in range(len(dataset)):
        _, target = dataset[index]
        boxes, category_ids = expected[target["image_id"]]
        assert target["labels"].dtype == torch.int64
        assert [dataset.label_to_category_id[label] for label in target["labels"].tolist()] == category_ids
        torch.testing.assert_close(target["boxes"], torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))


def test_crowd_boxes_stay_flagged_and_empty_images_give_empty_targets(tiny):
    dataset = _dataset(tiny)
    targets = {target["image_id"]: target for _, target in (dataset[i] for i in range(len(dataset)))}
    assert targets[1]["iscrowd"].tolist() == [0, 1]
    assert targets[5]["boxes"].shape == (0, 4) and targets[5]["labels"].shape == (0,)
    assert targets[5]["iscrowd"].shape == (0,)


def test_degenerate_boxes_are_dropped_with_one_logged_warning_counting_them(tiny, caplog, capsys):
    images_dir, dataset = tiny
    with caplog.at_level(logging.WARNING, logger="detfocal"):
        CocoDetection(images_dir, dataset)
    messages = _warnings(caplog)
    assert len(messages) == 1 and "dropped 2 degenerate boxes" in messages[0]
    assert caplog.records[0].name == "detfocal.data.coco"
    assert capsys.readouterr() == ("", "")  # logged, not printed


def test_grayscale_rgba_and_palette_files_become_rgb_floats(tiny):
    images_dir, _ = tiny
    dataset = _dataset(tiny)
    for index in range(len(dataset)):
        image, target = dataset[index]
        reference = Image.open(images_dir / f"{target['image_id']}.png").convert("RGB")
        expected = torch.from_numpy(np.asarray(reference).copy()).permute(2, 0, 1).float() / 255
        assert image.dtype == torch.float32 and image.shape == (3, SIZE, SIZE)
        torch.testing.assert_close(image, expected)
        assert target["orig_size"].tolist() == [SIZE, SIZE]


def test_keep_empty_false_skips_images_without_boxes_and_counts_them(tiny, caplog):
    images_dir, dataset = tiny
    with caplog.at_level(logging.WARNING, logger="detfocal"):
        subset = CocoDetection(images_dir, dataset, keep_empty=False)
    # Image 3 keeps a box (the other is degenerate); image 5 has none.
    assert [message for message in _warnings(caplog) if "skipped" in message] == [
        "CocoDetection: skipped 1 images without non-crowd boxes in <annotation dict> (keep_empty=False)"]
    assert sorted(subset.coco.getImgIds()) == subset.ids == [1, 2, 3, 4]


def test_categories_and_max_images_filter_through_make_subset(tiny):
    images_dir, dataset = tiny
    subset = CocoDetection(images_dir, dataset, categories=["train"])
    assert subset.label_to_category_id == [7] and subset.category_names == ["train"]
    assert len(CocoDetection(images_dir, dataset, categories=[7], max_images=2, seed=1)) == 2
    assert dataset["categories"][0]["id"] == 90  # the caller's dict is untouched


def test_coco_attribute_is_the_ground_truth_of_the_items(tiny):
    dataset = _dataset(tiny)
    assert dataset.ids == sorted(dataset.coco.getImgIds()) == [1, 2, 3, 4, 5]
    assert len(dataset.coco.getAnnIds()) == 7


def test_collate_fn_returns_a_tuple_of_lists(tiny):
    dataset = _dataset(tiny)
    images, targets = collate_fn([dataset[0], dataset[1]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2


def test_missing_image_file_names_the_file_and_the_annotation_file(tiny, tmp_path):
    images_dir, dataset = tiny
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(dataset))
    (images_dir / "2.png").unlink()
    coco = CocoDetection(images_dir, path)
    with pytest.raises(FileNotFoundError, match=r"2\.png.*ann\.json"):
        coco[1]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("images"), "no 'images'"),
        (lambda d: d["annotations"][0].update(image_id=999), "image_id.*999"),
        (lambda d: d["annotations"][0].update(category_id=5), "category_id.*5"),
        (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] has no \['bbox'\]"),
        (lambda d: d["annotations"][2].update(id=[1, 2]), r"annotations\[2\]\['id'\] is \[1, 2\], expected an int"),
        (lambda d: d["images"][1].update(id="2"), r"images\[1\]\['id'\] is '2', expected an int"),
        (lambda d: d["annotations"][0].update(image_id=1.0),
         r"annotations\[0\]\['image_id'\] is 1\.0, expected an int"),
        (lambda d: d["categories"][0].update(id=True), r"categories\[0\]\['id'\] is True, expected an int"),
        (lambda d: d["annotations"][1].update(bbox=[0, 0, float("nan"), 4]),
         r"\['bbox'\] is \[0, 0, nan, 4\], expected \[x, y, w, h\]"),
        (lambda d: d["annotations"][1].update(bbox=[0, 0, 4]), r"\['bbox'\] is \[0, 0, 4\], expected \[x, y, w, h\]"),
        (lambda d: d["annotations"][1].update(iscrowd="yes"), r"\['iscrowd'\] is 'yes', expected 0 or 1"),
        (lambda d: d["images"][0].update(file_name=["1.png"]),
         r"images\[0\]\['file_name'\] is \['1\.png'\], expected a non-empty string"),
        (lambda d: d["images"][0].update(width=-64), r"images\[0\]\['width'\] is -64, expected a positive number"),
    ],
)
def test_malformed_annotations_raise_value_error_saying_what_is_wrong(tiny, change, message):
    images_dir, dataset = tiny
    change(dataset)
    with pytest.raises(ValueError, match=message) as error:
        CocoDetection(images_dir, dataset)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"[" * 100000, b"{\"images\": "])
def test_annotation_file_that_is_not_json_raises_one_line_value_error(tmp_path, content):
    path = tmp_path / "ann.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"^annotation_file: .*ann\.json is not valid UTF-8 json \([^\n]*\)$"):
        make_subset(path)


def test_missing_annotation_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(tmp_path, tmp_path / "nope.json")


@pytest.mark.parametrize("change, message", [
    # faster-coco-eval holds ids as doubles: 2**53 + 1 and 2**53 would be one image.
    (lambda d: d["images"][1].update(id=2 ** 53 + 1),
     r"^annotation_file: <annotation dict>: images\[1\]\['id'\] is 9007199254740993, expected an int of magnitude "
     r"below 2\*\*53 = 9007199254740992$"),
    (lambda d: d["images"][0].update(id=-(2 ** 53)), r"images\[0\]\['id'\] is -9007199254740992, expected an int"),
    (lambda d: d["categories"][1].update(id=2 ** 60), r"categories\[1\]\['id'\] is 1152921504606846976, expected"),
    # COCOeval takes annotation id 0 for "unmatched", faster-coco-eval negative ones too.
    (lambda d: d["annotations"][0].update(id=0), r"annotations\[0\]\['id'\] is 0, expected an int in \[1, 2\*\*53"),
    (lambda d: d["annotations"][3].update(id=-4),
     r"annotations\[3\]\['id'\] is -4, expected an int in \[1, 2\*\*53"),
], ids=["image_2**53+1", "image_-2**53", "category_2**60", "annotation_0", "annotation_negative"])
def test_ids_that_the_evaluation_cannot_tell_apart_are_refused_at_load(tiny, change, message):
    images_dir, dataset = tiny
    change(dataset)
    with pytest.raises(ValueError, match=message) as error:
        CocoDetection(images_dir, dataset)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("bbox", [[0, 0, 1e300, 1e300], [-1e300, 0, 5, 5], [1e18, 0, 1e18, 5]])
def test_boxes_beyond_float32_box_arithmetic_are_refused_naming_the_annotation_id(tiny, tmp_path, bbox):
    images_dir, dataset = tiny
    for image in dataset["images"]:  # without a size to clamp to, the box would reach the targets as is
        del image["width"], image["height"]
    dataset["annotations"][2]["bbox"] = bbox
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(dataset))
    with pytest.raises(ValueError) as error:
        CocoDetection(images_dir, path)
    assert str(error.value) == (f"annotation_file: {path}: annotation id 3 (annotations[2]) has bbox {bbox!r}, with a "
                                f"corner beyond 1e+18 pixels, where float32 box areas overflow; expected [x, y, w, h] "
                                f"in pixels")


def test_boxes_just_inside_the_coordinate_limit_are_kept(tiny):
    images_dir, dataset = tiny
    dataset["annotations"][2]["bbox"] = [0, 0, 1e18, 1e18]
    _, target = CocoDetection(images_dir, dataset)[1]  # clamped to the 64 px image
    assert target["boxes"].tolist() == [[0.0, 0.0, 64.0, 64.0]]


@pytest.mark.parametrize("annotations", [[{"id": 1}], ("a.json",), 3])
def test_annotation_file_of_the_wrong_type_raises_value_error_naming_the_argument(tiny, annotations):
    images_dir, _ = tiny
    with pytest.raises(ValueError) as error:
        CocoDetection(images_dir, annotations)
    assert str(error.value) == (f"annotation_file: expected a path to a COCO json or a COCO dict, "
                                f"got a {type(annotations).__name__}")


@pytest.mark.parametrize("kwargs, expected", [
    ({}, "lists no images; expected at least one"),
    ({"max_images": 0}, "lists no images (after max_images=0); expected at least one"),
])
def test_an_empty_dataset_is_refused_at_load_naming_the_annotation_file(tiny, tmp_path, kwargs, expected):
    images_dir, dataset = tiny
    if not kwargs:
        dataset = {**dataset, "images": [], "annotations": []}
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(dataset))
    with pytest.raises(ValueError) as error:
        CocoDetection(images_dir, path, **kwargs)
    assert str(error.value) == f"annotation_file: {path} {expected}"


def test_a_dataset_left_empty_by_keep_empty_false_or_without_categories_is_refused(tiny):
    images_dir, dataset = tiny
    with pytest.raises(ValueError, match=r"^annotation_file: <annotation dict> lists no images \(after "
                                         r"categories=\[90\], keep_empty=False\); expected at least one$"):
        CocoDetection(images_dir, {**dataset, "annotations": dataset["annotations"][5:6]}, categories=[90],
                      keep_empty=False)  # its one box of category 90 lies outside the image
    with pytest.raises(ValueError, match=r"^annotation_file: <annotation dict> lists no categories; expected"):
        CocoDetection(images_dir, {**dataset, "categories": [], "annotations": []})


# --- broken image files ---------------------------------------------------------------------------

def _png(width, height, bit_depth, colour_type, rows=b""):
    """PNG bytes written by hand, so headers can claim any size and pixels can be 16-bit."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _png16(pixels):
    """A 16-bit greyscale (H, W) or RGB (H, W, 3) PNG of uint16 ``pixels``."""
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter byte 0 per row
    return _png(pixels.shape[1], pixels.shape[0], 16, 2 if pixels.ndim == 3 else 0, rows)


def _truncated_jpeg():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


# torchvision.io's decoders are the independent reference here; 0.29 deprecates them in favour of torchcodec.
TORCHVISION_DECODER = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

BROKEN_FILES = {
    "empty": (b"", "the file is empty"),
    "text": (b"not an image\n", "not in an image format PIL can read"),
    "truncated_jpeg": (_truncated_jpeg(), "image file is truncated"),
    "bomb_error": (_png(100000, 100000, 8, 2),
                   f"image claims 100000 x 100000 pixels, above PIL's limit of {Image.MAX_IMAGE_PIXELS}$"),
    # Between PIL's limit and twice it PIL only warns; that must be an error too.
    "bomb_warning": (_png(10000, 10000, 8, 2),
                     f"image claims 10000 x 10000 pixels, above PIL's limit of {Image.MAX_IMAGE_PIXELS}$"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN_FILES))
def test_undecodable_image_raises_one_line_value_error_naming_file_id_and_folder(tiny, kind):
    images_dir, _ = tiny
    content, reason = BROKEN_FILES[kind]
    (images_dir / "2.png").write_bytes(content)
    dataset = _dataset(tiny)
    with pytest.raises(ValueError) as error:
        dataset[1]
    message = str(error.value)
    assert message.startswith(f"image 2.png (id 2) in {images_dir} cannot be decoded: ") and "\n" not in message
    assert re.search(reason, message.split("cannot be decoded: ", 1)[1]), message


def test_skip_bad_images_returns_the_next_good_image_and_logs_each_file_once_with_a_count(tiny, caplog, capsys):
    images_dir, _ = tiny
    (images_dir / "2.png").write_bytes(BROKEN_FILES["truncated_jpeg"][0])
    (images_dir / "3.png").unlink()
    dataset = _dataset(tiny, skip_bad_images=True)
    caplog.set_level(logging.WARNING, logger="detfocal")
    caplog.clear()
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_fn, num_workers=0)
    for _ in range(2):
        batches = [[target["image_id"] for target in targets] for _, targets in loader]
        # Items 1 and 2 (ids 2 and 3) fall through to id 4: every batch keeps its size.
        assert batches == [[1, 4], [4, 4], [5]]
    assert dataset.bad_images == ["2.png", "3.png"] and dataset.num_bad_images == 2
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    warnings = _warnings(caplog)
    assert len(warnings) == 2 and capsys.readouterr() == ("", "")
    assert warnings[0].startswith("skipping a bad image (1 so far, skip_bad_images=True): image 2.png (id 2)")
    assert "(2 so far" in warnings[1] and "3.png" in warnings[1] and "does not exist" in warnings[1]


@pytest.mark.parametrize("kind", ["corrupt", "missing"])
def test_a_bad_image_read_by_a_dataloader_worker_raises_one_line_naming_the_file(tiny, kind):
    images_dir, _ = tiny
    if kind == "corrupt":
        (images_dir / "2.png").write_bytes(_png(SIZE, SIZE, 8, 2, b"\x00" * 7))  # too few pixel rows
    else:
        (images_dir / "2.png").unlink()
    loader = DataLoader(_dataset(tiny), batch_size=2, collate_fn=collate_fn, num_workers=1)
    expected_type = ValueError if kind == "corrupt" else FileNotFoundError
    with pytest.raises(expected_type) as error:
        list(loader)
    message = str(error.value)
    # The DataLoader re-raises a worker's exception with the worker's traceback as its message.
    assert "\n" not in message and "Traceback" not in message and "worker" not in message, message
    if kind == "corrupt":
        assert re.fullmatch(rf"image 2\.png \(id 2\) in {re.escape(str(images_dir))} cannot be decoded: .+", message)
    else:
        assert message == (f"image file {images_dir / '2.png'} (image id 2) listed in <annotation dict> "
                           f"does not exist")


def test_16bit_training_images_are_scaled_not_clipped(tiny):
    images_dir, _ = tiny
    pixels = np.linspace(0, 65535, SIZE * SIZE).round().astype(np.uint16).reshape(SIZE, SIZE)
    (images_dir / "5.png").write_bytes(_png16(pixels))
    image, target = _dataset(tiny)[4]
    assert target["image_id"] == 5
    # The transforms see uint8, as from any other file: one 8-bit step of tolerance.
    expected = torch.from_numpy(pixels.astype(np.float64) / 65535).float().expand(3, -1, -1)
    torch.testing.assert_close(image, expected, rtol=0, atol=1 / 255)


def test_skip_bad_images_raises_when_no_image_can_be_loaded(tiny):
    images_dir, _ = tiny
    for path in images_dir.glob("*.png"):
        path.write_bytes(b"")
    dataset = _dataset(tiny, skip_bad_images=True)
    with pytest.raises(ValueError, match=r"none of the 5 images .* can be loaded"):
        dataset[0]
    assert dataset.num_bad_images == 5


# --- load_image (inference) -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "P_transparent", "LA"])
@TORCHVISION_DECODER
def test_load_image_of_8bit_files_matches_torchvision_decoding(tmp_path, mode):
    pixels = np.random.default_rng(1).integers(0, 256, size=(SIZE, 48, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode.split("_")[0])
    if mode == "P_transparent":
        image.info["transparency"] = 0
    path = tmp_path / "image.png"
    image.save(path)
    loaded = load_image(path)
    # libpng through torchvision, independent of PIL: alpha dropped, palette and grey expanded.
    expected = F.to_dtype(decode_image(str(path), mode=ImageReadMode.RGB), torch.float32, scale=True)
    assert loaded.dtype == torch.float32 and loaded.shape == (3, SIZE, 48)
    torch.testing.assert_close(loaded, expected, rtol=0, atol=0)


def test_load_image_of_a_jpeg_matches_to_image_and_to_dtype(tmp_path):
    path = tmp_path / "image.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    expected = F.to_dtype(F.to_image(Image.open(path).convert("RGB")), torch.float32, scale=True)
    torch.testing.assert_close(load_image(path), expected.as_subclass(torch.Tensor), rtol=0, atol=0)


@TORCHVISION_DECODER
def test_load_image_scales_16bit_greyscale_png_by_65535_instead_of_clipping(tmp_path):
    pixels = np.linspace(0, 65535, SIZE * SIZE).round().astype(np.uint16).reshape(SIZE, SIZE)
    path = tmp_path / "grey16.png"
    path.write_bytes(_png16(pixels))
    loaded = load_image(path)
    # torchvision decodes 16-bit PNGs to uint16 with libpng.
    expected = decode_image(str(path)).to(torch.float64).div(65535).expand(3, -1, -1).float()
    assert loaded.shape == (3, SIZE, SIZE) and loaded.min() == 0 and loaded.max() == 1
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-6)
    assert (loaded < 254 / 255).float().mean() > 0.9  # not saturated, as convert("RGB") would make it


@TORCHVISION_DECODER
def test_load_image_reads_16bit_rgb_png_to_within_one_8bit_step(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 65536, size=(16, 24, 3)).astype(np.uint16)
    pixels[0, 0] = 65535
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png16(pixels))
    expected = decode_image(str(path)).to(torch.float64).div(65535).float()
    loaded = load_image(path)
    assert loaded.max() == 1
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1 / 255)


@pytest.mark.parametrize("kind", sorted(BROKEN_FILES))
def test_load_image_rejects_undecodable_files_on_one_line(tmp_path, kind):
    content, reason = BROKEN_FILES[kind]
    path = tmp_path / "image.jpg"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^image {path} cannot be decoded: ") as error:
        load_image(path)
    assert "\n" not in str(error.value)


def test_load_image_of_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")


def test_to_uint8_round_trips_8bit_images_and_clamps():
    pixels = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    assert torch.equal(to_uint8(F.to_dtype(pixels, torch.float32, scale=True)), pixels)
    assert to_uint8(torch.tensor([-0.5, 0.5, 1.5]).reshape(1, 1, 3)).tolist() == [[[0, 128, 255]]]
    with pytest.raises(ValueError, match=r"image: expected a float tensor \[3, H, W\].*torch.uint8"):
        to_uint8(pixels)


# --- transforms ---------------------------------------------------------------------------------

def _sample(boxes, labels, iscrowd, width=SIZE, height=48):
    image = tv_tensors.Image(torch.arange(3 * height * width, dtype=torch.uint8).reshape(3, height, width))
    target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32), format="XYXY",
                                                canvas_size=(height, width)),
              "labels": torch.tensor(labels), "iscrowd": torch.tensor(iscrowd)}
    return image, target


def test_hflip_mirrors_boxes_and_pixels():
    image, target = _sample([[10, 5, 30, 20], [0, 0, 64, 48]], [0, 1], [0, 1])
    flipped, out = build_transforms(train=True, hflip=1.0)(image, target)
    # x -> W - x, so [x1, x2] = [10, 30] becomes [64 - 30, 64 - 10].
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), torch.tensor([[34.0, 5, 54, 20], [0, 0, 64, 48]]))
    torch.testing.assert_close(flipped, image.flip(-1).float() / 255)
    assert out["labels"].tolist() == [0, 1] and out["iscrowd"].tolist() == [0, 1]


def test_sanitize_removes_small_boxes_with_their_labels_and_iscrowd():
    image, target = _sample([[0, 0, 10, 10], [5, 5, 5.5, 20], [20, 20, 40, 40]], [0, 1, 2], [1, 1, 0])
    _, out = build_transforms(train=True, hflip=0.0)(image, target)
    assert out["labels"].tolist() == [0, 2] and out["iscrowd"].tolist() == [1, 0]


def test_random_augmentations_keep_labels_and_iscrowd_aligned_with_boxes():
    transform = build_transforms(train=True, hflip=0.5, scale_jitter=(0.5, 1.5), photometric=True)
    labels = list(range(8))
    boxes = [[4 * k, 3 * k, 4 * k + 20, 3 * k + 12] for k in labels]
    for _ in range(20):
        _, out = transform(*_sample(boxes, labels, [k % 2 for k in labels]))
        assert len(out["boxes"]) == len(out["labels"]) == len(out["iscrowd"])
        assert out["iscrowd"].tolist() == [k % 2 for k in out["labels"].tolist()]


def test_eval_transforms_only_scale_the_image():
    image, target = _sample([[10, 5, 30, 20]], [0], [0])
    out_image, out = build_transforms(train=False)(image, target)
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), torch.tensor([[10.0, 5, 30, 20]]))
    torch.testing.assert_close(out_image, image.float() / 255)


@pytest.mark.parametrize("kwargs, name", [({"hflip": 1.5}, "hflip"), ({"scale_jitter": (1.2, 0.8)}, "scale_jitter")])
def test_build_transforms_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        build_transforms(train=True, **kwargs)


# --- make_subset on the real COCO sample ----------------------------------------------------------

@pytest.fixture(scope="module")
def sample_coco():
    coco = COCO()
    coco.dataset = json.loads(SAMPLE.read_text())
    coco.createIndex()
    return coco


def _assert_consistent(subset):
    image_ids = {image["id"] for image in subset["images"]}
    category_ids = {category["id"] for category in subset["categories"]}
    assert all(ann["image_id"] in image_ids and ann["category_id"] in category_ids for ann in subset["annotations"])
    coco = COCO()
    coco.dataset = subset
    coco.createIndex()  # pycocotools indexes it


def test_make_subset_by_category_names_keeps_those_annotations(sample_coco):
    subset = make_subset(SAMPLE, categories=["person", "dog"])
    _assert_consistent(subset)
    assert [c["id"] for c in subset["categories"]] == [1, 18]
    assert sorted(a["id"] for a in subset["annotations"]) == sorted(sample_coco.getAnnIds(catIds=[1, 18]))
    assert len(subset["images"]) == 100  # images without people or dogs stay as negatives
    assert subset["info"] == sample_coco.dataset["info"] and subset["licenses"] == sample_coco.dataset["licenses"]


def test_make_subset_max_images_is_deterministic_by_seed(sample_coco):
    first = make_subset(SAMPLE, max_images=10, seed=3)
    _assert_consistent(first)
    image_ids = [image["id"] for image in first["images"]]
    assert len(image_ids) == 10 and image_ids == [image["id"] for image in make_subset(SAMPLE, max_images=10, seed=3)["images"]]
    assert image_ids != [image["id"] for image in make_subset(SAMPLE, max_images=10, seed=4)["images"]]
    assert sorted(a["id"] for a in first["annotations"]) == sorted(sample_coco.getAnnIds(imgIds=image_ids))
    assert len(first["categories"]) == 80


def test_make_subset_image_ids_and_min_annotations(sample_coco):
    chosen = sample_coco.getImgIds()[:5]
    subset = make_subset(sample_coco.dataset, image_ids=chosen, categories=[1], min_annotations=1)
    _assert_consistent(subset)
    expected = [i for i in chosen if sample_coco.getAnnIds(imgIds=[i], catIds=[1], iscrowd=False)]
    assert sorted(image["id"] for image in subset["images"]) == sorted(expected)


def test_make_subset_leaves_the_input_dict_unchanged(sample_coco):
    before = copy.deepcopy(sample_coco.dataset)
    subset = make_subset(sample_coco.dataset, categories=["cat"], max_images=3)
    subset["images"][0]["id"] = -1
    assert sample_coco.dataset == before


def test_unknown_category_name_lists_close_matches():
    with pytest.raises(ValueError, match="unknown category name 'persn'.*close matches: person"):
        make_subset(SAMPLE, categories=["persn"])


@pytest.mark.parametrize("kwargs, message", [({"categories": [1000]}, "unknown category id 1000"),
                                             ({"image_ids": [-5]}, r"image_ids.*\[-5\]"),
                                             ({"max_images": -1}, "max_images")])
def test_make_subset_rejects_unknown_ids_and_bad_counts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_subset(SAMPLE, **kwargs)


def test_check_output_path_refuses_the_input_file_under_any_name(tmp_path, monkeypatch):
    source = tmp_path / "in.json"
    source.write_text("{}")
    (tmp_path / "sub").mkdir()
    os.symlink(source, tmp_path / "link.json")
    os.link(source, tmp_path / "hard.json")
    monkeypatch.chdir(tmp_path / "sub")
    aliases = (source, "../in.json", tmp_path / "sub" / ".." / "in.json", tmp_path / "link.json", tmp_path / "hard.json")
    for out in aliases:
        with pytest.raises(ValueError, match=r"^--out .* is the input annotation file.*; write the subset elsewhere$"):
            check_output_path(out, [SAMPLE, source])
    with pytest.raises(ValueError, match=r"^--out in\.json is the input annotation file; write the subset elsewhere$"):
        monkeypatch.chdir(tmp_path)
        check_output_path("in.json", ["in.json"])


def _unwritable_folder(tmp_path):
    """A folder where no file can be created: read-only by mode, or /sys (read-only) for root."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            tempfile.TemporaryFile(dir=candidate).close()
        except OSError:
            return candidate
    pytest.skip("no folder here refuses new files (root, and /sys is writable)")


def test_subset_command_refuses_a_folder_or_unwritable_out_before_any_work(tmp_path, capsys):
    source = tmp_path / "in.json"
    source.write_text(SAMPLE.read_text())
    read_only = _unwritable_folder(tmp_path)
    cases = [(tmp_path, f"error: --out {tmp_path} is a folder, expected a json file path"),
             (read_only / "sub.json", f"error: --out {read_only / 'sub.json'} cannot be written in {read_only}: "),
             (read_only / "new" / "sub.json", f"error: --out {read_only / 'new' / 'sub.json'} cannot be written in "
                                              f"{read_only}: ")]
    before = sorted(tmp_path.rglob("*"))
    for out, expected in cases:
        # A misspelt category fails later, in the work: the output path is checked first.
        assert cli_main(["subset", str(source), "--categories", "persn", "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert error.startswith(expected) and error.count("\n") == 1 and ".tmp" not in error, error
    assert sorted(tmp_path.rglob("*")) == before and source.read_text() == SAMPLE.read_text()


def test_check_output_path_accepts_a_new_or_other_file(tmp_path):
    source = tmp_path / "in.json"
    source.write_text("{}")
    (tmp_path / "other.json").write_text("{}")
    for out in (tmp_path / "new.json", tmp_path / "other.json", tmp_path / "new" / "folder" / "sub.json"):
        check_output_path(out, [source, {"images": []}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json", "other.json"]  # nothing created


# --- the shapes dataset ---------------------------------------------------------------------------

TINY_SHAPES = {"num_train": 4, "num_val": 2, "image_size": 64}


def test_shapes_generate_is_byte_identical_across_runs(tmp_path):
    first = shapes.generate(tmp_path / "a", seed=5, **TINY_SHAPES)
    shapes.generate(tmp_path / "b", seed=5, **TINY_SHAPES)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 4 + 2 + 2 + 1  # images, annotations, marker
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert first["val_annotations"] == tmp_path / "a" / "annotations" / "instances_val.json"


def test_shapes_json_is_valid_coco_with_non_contiguous_ids(tmp_path):
    paths = shapes.generate(tmp_path, seed=1, **TINY_SHAPES)
    coco = COCO(str(paths["train_annotations"]))
    assert coco.getCatIds() == [1, 3, 7, 12, 20]
    for ann in coco.loadAnns(coco.getAnnIds()):
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w > 0 and h > 0 and 0 < ann["area"] <= w * h
    dataset = CocoDetection(paths["train_images"], paths["train_annotations"])
    assert dataset.num_classes == 5 and dataset[0][0].shape == (3, 64, 64)


def test_shapes_generate_reuses_files_written_with_the_same_parameters(tmp_path):
    paths = shapes.generate(tmp_path, **TINY_SHAPES)
    stamp = paths["train_annotations"].stat().st_mtime_ns
    shapes.generate(tmp_path, **TINY_SHAPES)
    assert paths["train_annotations"].stat().st_mtime_ns == stamp
    shapes.generate(tmp_path, **{**TINY_SHAPES, "num_train": 5})
    assert len(json.loads(paths["train_annotations"].read_text())["images"]) == 5


def test_shapes_generate_refuses_a_non_empty_folder_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=rf"out_dir: {tmp_path} is a non-empty folder that holds no shapes dataset"):
        shapes.generate(tmp_path, **TINY_SHAPES)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="out_dir: .*notes.txt is a file"):
        shapes.generate(tmp_path / "notes.txt", **TINY_SHAPES)


def test_shapes_generate_writes_into_new_empty_and_its_own_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    shapes.generate(tmp_path / "empty", **TINY_SHAPES)
    shapes.generate(tmp_path / "empty", **{**TINY_SHAPES, "num_val": 3})  # refreshes its own folder
    # A folder from before the marker file existed is recognised by its annotations.
    (tmp_path / "empty" / shapes.MARKER_FILE).unlink()
    paths = shapes.generate(tmp_path / "empty", **TINY_SHAPES)
    assert len(json.loads(paths["val_annotations"].read_text())["images"]) == 2
    assert (tmp_path / "empty" / shapes.MARKER_FILE).is_file()


def test_shapes_rare_class_and_empty_images_are_about_five_percent():
    counts: Counter = Counter()
    num_empty = 0
    for index in range(400):
        _, objects = shapes.render_image(np.random.default_rng([0, 0, index]), 64, 6, 8)
        counts.update(obj["category_id"] for obj in objects)
        num_empty += not objects
    assert 0.03 <= counts[12] / sum(counts.values()) <= 0.08  # "star", id 12
    assert 0.025 <= num_empty / 400 <= 0.085
    assert set(counts) == {1, 3, 7, 12, 20}


@pytest.mark.parametrize("name, value, expected", [
    ("image_size", 8, "image_size: expected an int in [32, 4096], got 8"),
    ("image_size", 100000, "image_size: expected an int in [32, 4096], got 100000"),
    ("max_objects", 10 ** 9, "max_objects: expected an int in [1, 100], got 1000000000"),
    ("num_train", 10 ** 6, "num_train: expected an int in [0, 100000], got 1000000"),
    ("num_val", -1, "num_val: expected an int in [0, 100000], got -1"),
    ("min_object_size", 3000, "min_object_size: expected an int in [4, 2048], got 3000"),
    ("seed", -1, "seed: expected an int in [0, 4294967295], got -1"),
    ("seed", 2 ** 32, "seed: expected an int in [0, 4294967295], got 4294967296"),
])
def test_shapes_generate_refuses_values_out_of_range_before_writing_anything(tmp_path, name, value, expected):
    with pytest.raises(ValueError) as error:
        shapes.generate(tmp_path / "shapes", **{name: value})
    assert str(error.value) == expected
    assert not (tmp_path / "shapes").exists()


def test_shapes_limits_are_those_of_the_config():
    from detfocal.config import schema

    assert (shapes.MAX_IMAGES, shapes.MAX_IMAGE_SIZE, shapes.MAX_OBJECTS, shapes.SEED_LIMIT) == (
        schema.MAX_SHAPES_IMAGES, schema.MAX_IMAGE_SIZE, schema.MAX_SHAPES_OBJECTS, schema.SEED_LIMIT)


@pytest.mark.parametrize("option, value, expected", [
    ("--max-objects", "1000000000", "error: max_objects: expected an int in [1, 100], got 1000000000"),
    ("--image-size", "100000", "error: image_size: expected an int in [32, 4096], got 100000"),
])
def test_shapes_command_refuses_huge_values_on_one_line_before_any_work(tmp_path, capsys, option, value, expected):
    assert cli_main(["shapes", "--out", str(tmp_path / "shapes"), option, value, "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.err == expected + "\n" and captured.out == ""
    assert not (tmp_path / "shapes").exists()


# --- command-line tools ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tool_runs(tmp_path_factory):
    """Run the tools once each, in parallel: most of their time is importing torch."""
    out = tmp_path_factory.mktemp("tools")
    commands = {
        "subset": ["tools/make_subset.py", str(SAMPLE), "--categories", "person,18", "--max-images", "7",
                   "--out", str(out / "sub.json")],
        "bad_category": ["tools/make_subset.py", str(SAMPLE), "--categories", "persn", "--out", str(out / "x.json")],
        "shapes": ["tools/make_shapes.py", "--out", str(out / "shapes"), "--num-train", "3", "--num-val", "2",
                   "--image-size", "64", "--no-progress"],
    }
    processes = {name: subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True) for name, args in commands.items()}
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=120)
        results[name] = (process.returncode, stdout, stderr)
    return out, results


@pytest.mark.slow
def test_make_subset_tool_writes_the_subset_and_a_one_line_summary(tool_runs):
    out, results = tool_runs
    returncode, stdout, stderr = results["subset"]
    assert returncode == 0, stderr
    subset = json.loads((out / "sub.json").read_text())
    assert stdout.strip() == f"{out / 'sub.json'}: 7 images, {len(subset['annotations'])} annotations, 2 categories"
    assert subset == make_subset(SAMPLE, categories=["person", 18], max_images=7)


@pytest.mark.slow
def test_make_subset_tool_reports_a_bad_category_on_one_line(tool_runs):
    out, results = tool_runs
    returncode, _, stderr = results["bad_category"]
    assert returncode != 0 and not (out / "x.json").exists()
    assert stderr.strip().splitlines() == [stderr.strip()]
    assert stderr.startswith("error: ") and "person" in stderr


@pytest.mark.slow
def test_make_shapes_tool_generates_the_dataset(tool_runs):
    out, results = tool_runs
    returncode, stdout, stderr = results["shapes"]
    assert returncode == 0, stderr
    assert "train: 3 images" in stdout and len(list((out / "shapes" / "val").glob("*.png"))) == 2
