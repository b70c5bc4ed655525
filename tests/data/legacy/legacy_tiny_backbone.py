"""A backbone of a few thousand parameters, registered as "legacy_tiny", so that a checkpoint
written by an older detfocal fits in tests/data (a resnet18 one would be 45 MB).

Registered through the config's ``imports:`` key, the way a user registers their own backbone.
"""
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detfocal import BACKBONES


@BACKBONES.register("legacy_tiny")
def legacy_tiny(*, weights=None, trainable_layers=None, fpn_channels=16):
    def stage(cin, cout):  # halves the resolution
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU())

    trunk = nn.Sequential(stage(3, 8), stage(8, 8), stage(8, 8), stage(8, 16), stage(16, 16))  # strides 2..32
    body = BackboneWithFPN(trunk, {"2": "0", "3": "1", "4": "2"}, [8, 16, 16], fpn_channels,
                           extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
    return body, fpn_channels
