"""Train a detector from a YAML config: ``python tools/train.py ...`` is ``detfocal train ...`` (see ``detfocal train --help``)."""
import sys

from detfocal.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
