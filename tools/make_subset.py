"""Write a COCO annotation subset: some categories, a seeded sample of images, original ids kept.

Example:
    python tools/make_subset.py instances_val2017.json --categories person,dog --max-images 500 --out sub.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detfocal.cli import run_cli  # noqa: E402
from detfocal.data.subset import make_subset, summarize_subset
from detfocal.io import write_json_atomic  # noqa: E402


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("annotations", help="COCO instances json")
    parser.add_argument("--categories", help="comma-separated category names or ids, e.g. person,dog or 1,18")
    parser.add_argument("--max-images", type=int, help="keep at most this many images (seeded sample)")
    parser.add_argument("--image-ids", help="comma-separated image ids to keep")
    parser.add_argument("--min-annotations", type=int, default=0,
                        help="keep only images with at least this many non-crowd boxes of the kept categories")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-images sample")
    parser.add_argument("--out", required=True, help="output json path")
    args = parser.parse_args(argv)

    # Digits are category ids; anything else is a name (COCO names are never numbers).
    categories = None
    if args.categories is not None:
        categories = [int(item) if item.isdigit() else item for item in _split_list(args.categories)]
    image_ids = None
    if args.image_ids is not None:
        try:
            image_ids = [int(item) for item in _split_list(args.image_ids)]
        except ValueError:
            raise ValueError(f"--image-ids: expected comma-separated integers, got {args.image_ids!r}") from None
    subset = make_subset(args.annotations, categories=categories, max_images=args.max_images,
                         image_ids=image_ids, min_annotations=args.min_annotations, seed=args.seed)
    out = write_json_atomic(args.out, subset)
    print(f"{out}: {summarize_subset(subset)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
