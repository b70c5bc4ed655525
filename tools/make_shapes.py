"""Generate the embedded shapes dataset: ``python tools/make_shapes.py ...`` is ``detfocal shapes ...`` (see ``detfocal shapes --help``)."""
import sys

from detfocal.cli import main

if __name__ == "__main__":
    sys.exit(main(["shapes", *sys.argv[1:]]))
