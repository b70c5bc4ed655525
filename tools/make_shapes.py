"""Generate the shapes dataset (coloured geometric shapes, COCO format) used by the training demo.

Example:
    python tools/make_shapes.py --out data/shapes
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detfocal.cli import run_cli  # noqa: E402
from detfocal.data import shapes  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/shapes", help="output folder (default: data/shapes)")
    # Unset options keep generate()'s defaults, which are tuned for the demo.
    parser.add_argument("--num-train", type=int, help="number of training images")
    parser.add_argument("--num-val", type=int, help="number of validation images")
    parser.add_argument("--image-size", type=int, help="image width and height in pixels")
    parser.add_argument("--max-objects", type=int, help="most objects per image")
    parser.add_argument("--min-object-size", type=int, help="smallest object diameter in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    options = {name: getattr(args, name) for name in
               ("num_train", "num_val", "image_size", "max_objects", "min_object_size") if getattr(args, name) is not None}
    paths = shapes.generate(args.out, seed=args.seed, progress=not args.no_progress, **options)
    for split in ("train", "val"):
        with open(paths[f"{split}_annotations"], "r", encoding="utf-8") as handle:
            dataset = json.load(handle)
        print(f"{split}: {len(dataset['images'])} images, {len(dataset['annotations'])} annotations "
              f"in {paths[f'{split}_images']}, {paths[f'{split}_annotations']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
