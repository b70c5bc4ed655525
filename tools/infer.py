"""Draw a checkpoint's detections on images: ``python tools/infer.py ...`` is ``detfocal infer ...`` (see ``detfocal infer --help``)."""
import sys

from detfocal.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
