"""Focal losses: sigmoid (the detector's loss), softmax, and the rest of the family."""
from ._fused import backend
from .focal import SigmoidFocalLoss, focal_terms, sigmoid_focal_loss, softmax_focal_loss

__all__ = ["SigmoidFocalLoss", "backend", "focal_terms", "sigmoid_focal_loss", "softmax_focal_loss"]
