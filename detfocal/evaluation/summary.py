"""The COCO summary as pycocotools prints it, with the per-class AP: what ``detfocal eval`` and
``detfocal train`` print as their result."""
from __future__ import annotations

from typing import Any, Mapping

from detfocal.evaluation.coco import STAT_NAMES

__all__ = ["format_summary"]


# pycocotools' summary lines, in the order of STAT_NAMES: (AP or AR, IoU range, area, max detections).
_COCO_ROWS = [("Precision", "(AP)", "0.50:0.95", "all", 100), ("Precision", "(AP)", "0.50", "all", 100),
              ("Precision", "(AP)", "0.75", "all", 100), ("Precision", "(AP)", "0.50:0.95", "small", 100),
              ("Precision", "(AP)", "0.50:0.95", "medium", 100), ("Precision", "(AP)", "0.50:0.95", "large", 100),
              ("Recall", "(AR)", "0.50:0.95", "all", 1), ("Recall", "(AR)", "0.50:0.95", "all", 10),
              ("Recall", "(AR)", "0.50:0.95", "all", 100), ("Recall", "(AR)", "0.50:0.95", "small", 100),
              ("Recall", "(AR)", "0.50:0.95", "medium", 100), ("Recall", "(AR)", "0.50:0.95", "large", 100)]


def format_summary(summary: Mapping[str, Any], columns: int = 4) -> str:
    """The COCO table as pycocotools prints it, then the per-class AP in ``columns`` columns.

    -1 means the ground truth has no box of that kind (pycocotools' convention).
    """
    lines = [f" {'Average ' + kind:<18} {short} @[ IoU={iou:<9} | area={area:>6s} | maxDets={dets:>3d} ] = "
             f"{summary.get(name, float('nan')):0.3f}"
             for name, (kind, short, iou, area, dets) in zip(STAT_NAMES, _COCO_ROWS)]
    per_class = list(summary.get("per_class", {}).items())
    if per_class:
        width = max(len(name) for name, _ in per_class)
        lines.append("per-class AP (IoU 0.50:0.95, -1: no ground truth):")
        cells = [f"{name:<{width}} {ap:6.3f}" for name, ap in per_class]
        lines += ["  " + "   ".join(cells[i:i + columns]) for i in range(0, len(cells), columns)]
    return "\n".join(lines)
