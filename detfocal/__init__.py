"""detfocal: a sigmoid focal-loss classification head for torchvision RetinaNet detectors.

Importing the package registers the built-in heads ("focal"), backbones (resnet18/34/50/101,
mobilenet_v3_large) and detectors ("retinanet").
"""
from . import backbones, distributed, gfl_heads, heads, models  # noqa: F401  (imports register the built-ins)
from .heads import FocalClassificationHead, focal_head_loss, labels_from_matched_idxs
from .losses import SigmoidFocalLoss, sigmoid_focal_loss, softmax_focal_loss
from .models import FocalRetinaNet, build_retinanet, convert_retinanet
from .registry import BACKBONES, DETECTORS, HEADS, Registry

__version__ = "0.1.0"
__all__ = ["BACKBONES", "DETECTORS", "FocalClassificationHead", "FocalRetinaNet", "HEADS", "Registry",
           "SigmoidFocalLoss", "build_retinanet", "convert_retinanet", "focal_head_loss", "labels_from_matched_idxs",
           "sigmoid_focal_loss", "softmax_focal_loss"]
