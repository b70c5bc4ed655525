"""Focal losses: sigmoid (the detector's loss), softmax, and the rest of the family."""
from .autograd import double_backward
from .compile import backend
from .dynamic_alpha import alpha_from_object_counts
from .focal import SigmoidFocalLoss, focal_terms, sigmoid_focal_loss
from .focal_cosine import focal_cosine_loss
from .focal_star import sigmoid_focal_loss_star
from .probs import binary_cross_entropy_with_probs, focal_loss_with_probs, nll_loss_with_probs
from .quality import quality_focal_loss, varifocal_loss
from .softmax import softmax_focal_loss

__all__ = ["SigmoidFocalLoss", "backend", "double_backward", "focal_terms", "sigmoid_focal_loss", "softmax_focal_loss",
           "alpha_from_object_counts", "binary_cross_entropy_with_probs", "focal_cosine_loss", "focal_loss_with_probs",
           "nll_loss_with_probs", "quality_focal_loss", "sigmoid_focal_loss_star", "varifocal_loss"]
