"""Write a subset of a COCO annotation file: ``python tools/make_subset.py ...`` is ``detfocal subset ...`` (see ``detfocal subset --help``)."""
import sys

from detfocal.cli import main

if __name__ == "__main__":
    sys.exit(main(["subset", *sys.argv[1:]]))
