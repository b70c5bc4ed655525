"""``python -m detfocal.benchmark``: the same as ``detfocal benchmark`` (and the cases' subprocess entry)."""
import sys

from detfocal.benchmark import main
from detfocal.cli import run_cli
from detfocal.utils.logger import setup_logging

setup_logging()
sys.exit(run_cli(main))
