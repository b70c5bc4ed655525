"""The detector: backbones (C3-C5 + FPN), focal and quality classification heads, RetinaNet."""
from detfocal.modeling.heads import FocalClassificationHead, focal_head_loss, labels_from_matched_idxs
from detfocal.modeling.quality_heads import (QualityFocalClassificationHead, VarifocalClassificationHead,
                                             box_quality_targets)
from detfocal.modeling.retinanet import FocalRetinaNet, build_retinanet, convert_retinanet

__all__ = ["FocalClassificationHead", "FocalRetinaNet", "QualityFocalClassificationHead",
           "VarifocalClassificationHead", "box_quality_targets", "build_retinanet", "convert_retinanet",
           "focal_head_loss", "labels_from_matched_idxs"]
