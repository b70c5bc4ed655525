"""Draw the focal-loss figures: ``python tools/plot_focal.py ...`` is ``detfocal plot-focal ...`` (see ``detfocal plot-focal --help``)."""
import sys

from detfocal.cli import main

if __name__ == "__main__":
    sys.exit(main(["plot-focal", *sys.argv[1:]]))
