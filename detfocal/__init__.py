"""detfocal: a sigmoid focal-loss classification head for torchvision RetinaNet detectors.

Importing the package registers the built-in heads, backbones and detectors.
"""
from .losses import SigmoidFocalLoss, sigmoid_focal_loss, softmax_focal_loss
from .registry import BACKBONES, DETECTORS, HEADS, Registry

__version__ = "0.1.0"
__all__ = ["BACKBONES", "DETECTORS", "HEADS", "Registry", "SigmoidFocalLoss", "sigmoid_focal_loss",
           "softmax_focal_loss"]
