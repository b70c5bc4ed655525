"""``detfocal study``: controlled studies built from many short trainings.

``imbalance`` (the only one): alpha-balanced cross entropy against the focal loss as the
negatives per positive of an image grow from about 10^2 to 10^4. The points, the plan and
the measurements are in :mod:`.imbalance`, the table and figure in :mod:`.report`, the
command in :mod:`.command`.
"""
from .command import build_parser, main

__all__ = ["build_parser", "main"]
