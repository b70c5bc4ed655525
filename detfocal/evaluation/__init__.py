"""COCO box evaluation (pycocotools) and the figures drawn from runs and losses."""
from detfocal.evaluation.coco import STAT_NAMES, CocoEvaluator, evaluate_results

__all__ = ["STAT_NAMES", "CocoEvaluator", "evaluate_results"]
