"""COCO-evaluate a checkpoint: ``python tools/eval.py ...`` is ``detfocal eval ...`` (see ``detfocal eval --help``)."""
import sys

from detfocal.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
