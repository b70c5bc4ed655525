"""``python -m detfocal COMMAND ...``: the same commands as the ``detfocal`` console script."""
import sys

from detfocal.cli import main

sys.exit(main())
