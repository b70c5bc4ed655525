"""Benchmark the loss, head, training step and COCO evaluation: ``python tools/benchmark.py ...`` is ``detfocal benchmark ...`` (see ``detfocal benchmark --help``)."""
import sys

from detfocal.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
