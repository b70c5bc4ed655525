"""Draw a checkpoint's detections on images: ``python tools/infer.py CHECKPOINT IMAGE... --out DIR``.

    python tools/infer.py runs/shapes_retinanet_r18/best.pth data/shapes/val/00000[1-5].png --out /tmp/det

Each IMAGE becomes ``DIR/<name>.png`` with its boxes, class names and scores (detections with
a score >= ``--score-thresh``); one line per image is printed.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# libgomp's threads spin while they wait; when other processes share the cores (2 here) the
# spinning starves the work: a training step measured 8x slower. Passive waiting costs little
# on an idle machine. Set before torch starts its thread pool; the environment's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
from typing import Sequence

import torch
from torchvision.io import ImageReadMode, decode_image, write_png
from torchvision.utils import draw_bounding_boxes

import detfocal.modeling.retinanet  # noqa: F401  (registers the built-in backbones, heads and detectors)
from detfocal.engine.checkpoint import load_checkpoint
from detfocal.cli import run_cli
from detfocal.config import config_from_dict, model_kwargs
from detfocal.registry import DETECTORS

# Tableau's 10 colours: one per class (cycled), so a class keeps its colour across images.
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a .pth written by tools/train.py")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG or JPEG files")
    parser.add_argument("--out", type=Path, required=True, help="folder for the drawn PNGs")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="lowest score drawn (default 0.5)")
    parser.add_argument("--min-draw-size", type=int, default=512, metavar="PX",
                        help="enlarge smaller images by a whole factor until their longer side reaches PX before "
                             "drawing, so the labels stay readable (default 512; 0: draw at the input size)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0.0 <= args.score_thresh <= 1.0:
        raise ValueError(f"--score-thresh: expected a score in [0, 1], got {args.score_thresh}")
    if args.min_draw_size < 0:
        raise ValueError(f"--min-draw-size: expected pixels >= 0, got {args.min_draw_size}")
    missing = [str(path) for path in args.images if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"image {missing[0]} does not exist" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    checkpoint = load_checkpoint(args.checkpoint)
    if "config" not in checkpoint or "category_names" not in checkpoint:
        raise ValueError(f"checkpoint {args.checkpoint} has no config or category names; is it a tools/train.py checkpoint?")
    cfg = config_from_dict(checkpoint["config"])
    names = list(checkpoint["category_names"])
    kwargs = model_kwargs(cfg, checkpoint["num_classes"]) | {"weights_backbone": None, "score_thresh": args.score_thresh}
    model = DETECTORS.get(cfg.model.type)(**kwargs)
    model.load_state_dict(checkpoint["model"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()

    args.out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for path in args.images:
        try:
            image = decode_image(str(path), mode=ImageReadMode.RGB)  # uint8 [3, H, W]
        except RuntimeError as exc:
            raise ValueError(f"image {path} cannot be decoded ({' '.join(str(exc).split())[:200]})") from None
        with torch.no_grad():
            detections = model([image.to(device, torch.float32) / 255])[0]
        keep = detections["scores"] >= args.score_thresh
        boxes, scores, labels = (detections[key][keep].cpu() for key in ("boxes", "scores", "labels"))
        label_names = [names[label] if label < len(names) else str(label) for label in labels.tolist()]
        texts = [f"{name} {score:.2f}" for name, score in zip(label_names, scores.tolist())]
        colors = [PALETTE[label % len(PALETTE)] for label in labels.tolist()]
        # The label font is a fixed ~11 px: on a 128 px image it would cover the objects. Whole
        # factors with pixel repetition keep the image's pixels crisp and the boxes exact.
        factor = max(1, -(-args.min_draw_size // max(image.shape[1:])))  # ceil division
        if factor > 1:
            image = image.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
            boxes = boxes * factor
        drawn = draw_bounding_boxes(image, boxes, labels=texts, colors=colors, width=2) if len(boxes) else image
        # Two inputs with the same name (from different folders) must not overwrite each other.
        stem, index = path.stem, 1
        while stem in used:
            stem, index = f"{path.stem}_{index}", index + 1
        used.add(stem)
        write_png(drawn, str(args.out / f"{stem}.png"))
        found = ", ".join(sorted(set(label_names))) or "nothing"
        print(f"{path}: {len(boxes)} detections ({found}) -> {args.out / f'{stem}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
