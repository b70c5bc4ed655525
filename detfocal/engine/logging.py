"""Run logs: one JSON line per event in metrics.jsonl, TensorBoard events, and the COCO summary as
pycocotools prints it."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from detfocal.evaluation.coco import STAT_NAMES


def append_metrics(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line (with a wall-clock ``time``) to ``path``."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")


def open_tensorboard(out_dir: str | Path, enabled: bool) -> Any:
    """A ``SummaryWriter`` writing to ``out_dir/tensorboard``, or None when disabled.

    Raises:
        ValueError: enabled, but the ``tensorboard`` package is missing.
    """
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("train.tensorboard: true needs the tensorboard package (pip install tensorboard), "
                         "or set train.tensorboard=false") from None
    return SummaryWriter(str(Path(out_dir) / "tensorboard"))


def log_scalars(writer: Any, prefix: str, values: Mapping[str, Any], step: int) -> None:
    """Write every finite number of ``values`` as ``prefix/name`` at ``step`` (no-op without a writer)."""
    if writer is None:
        return
    for name, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            writer.add_scalar(f"{prefix}/{name}", value, step)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


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
