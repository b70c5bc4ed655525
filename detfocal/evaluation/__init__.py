"""COCO box evaluation (pycocotools or faster-coco-eval) and the figures drawn from runs and losses."""
from detfocal.evaluation.coco import (BACKENDS, STAT_NAMES, CocoEvaluator, evaluate_results, per_class_table,
                                      resolve_backend, write_per_class_csv)

__all__ = ["BACKENDS", "STAT_NAMES", "CocoEvaluator", "evaluate_results", "per_class_table", "resolve_backend",
           "write_per_class_csv"]
