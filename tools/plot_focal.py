"""Draw the focal-loss figures: the paper's Figure 1, its gradient curves, and FL against FL*.

Usage:
    python tools/plot_focal.py --out plots/

Writes focal_loss, focal_gradient and fl_star, each as PNG and SVG, and prints the paths.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import argparse  # noqa: E402
from typing import Sequence  # noqa: E402

from detfocal.cli import run_cli  # noqa: E402
from detfocal.evaluation.plots import write_figures  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw the focal-loss figures (PNG and SVG).")
    parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    args = parser.parse_args(argv)
    for path in write_figures(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
