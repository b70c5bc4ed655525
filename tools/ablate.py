"""Train over a grid of settings and write the paper's Table 1: ``python tools/ablate.py ...`` is ``detfocal ablate ...`` (see ``detfocal ablate --help``)."""
import sys

from detfocal.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
