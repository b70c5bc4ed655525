"""Export a checkpoint to ONNX: ``python tools/export.py ...`` is ``detfocal export ...`` (see ``detfocal export --help``)."""
import sys

from detfocal.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
