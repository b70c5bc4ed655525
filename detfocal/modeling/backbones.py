"""Backbones for RetinaNet: torchvision classifiers as C3-C5 feature extractors plus an FPN giving P3-P7.

A ``BACKBONES`` entry is called as ``f(weights=..., trainable_layers=..., fpn_channels=...)``
and returns ``(module giving 5 maps P3-P7 as a dict, out_channels)``. Trained from scratch,
a backbone uses trainable BatchNorm; with pretrained weights it uses FrozenBatchNorm2d,
as torchvision does. P6 and P7 come from :class:`LastLevelP6P7Fp32`, torchvision's
``LastLevelP6P7`` with the same state_dict keys, robust to bf16 on tiny maps.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models import WeightsEnum
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detfocal.utils.registry import BACKBONES

__all__ = ["LastLevelP6P7Fp32", "resolve_backbone_weights"]


class LastLevelP6P7Fp32(LastLevelP6P7):
    """torchvision's ``LastLevelP6P7`` (P6 = conv(P5), P7 = conv(relu(P6))), computed in fp32.

    oneDNN's bf16 3x3 stride-2 convolution can return non-finite gradients on a 1x1 input
    (seen with channels_last on an AVX-512-BF16 CPU). In RetinaNet that is the
    P6 -> P7 conv whenever the image is 64 px or smaller. So both convs run with autocast
    off, on fp32 contiguous (NCHW) input and weights, whatever the map size: converting
    only maps with a side <= 2 was the slower choice, since bf16 convs are emulated on
    CPUs without AVX-512-BF16 (figures on the docs' benchmarks page), and on a GPU these two
    small convs are a negligible share of the step. Under autocast P6 and P7 come out fp32 (the
    head's convs cast them as usual); without autocast they come out in the input's dtype.

    Only ``forward`` changes: the modules (``p6``, ``p7``), their initialisation,
    ``use_P5`` and the state_dict keys are torchvision's, so its checkpoints load as they are.
    """

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        x = p[-1] if self.use_P5 else c[-1]
        keep_fp32 = torch.is_autocast_enabled(x.device.type)
        with torch.autocast(device_type=x.device.type, enabled=False):
            p6 = _conv_fp32(self.p6, x.float())
            p7 = _conv_fp32(self.p7, F.relu(p6))
        if not keep_fp32:
            p6, p7 = p6.to(x.dtype), p7.to(x.dtype)
        p.extend([p6, p7])
        names.extend(["p6", "p7"])
        return p, names


def _conv_fp32(conv: nn.Conv2d, x: Tensor) -> Tensor:
    bias = None if conv.bias is None else conv.bias.float()
    return F.conv2d(x.contiguous(), conv.weight.float().contiguous(), bias, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


# --------------------------------------------------------------------------------------
def resolve_backbone_weights(backbone: str, weights: str | os.PathLike | WeightsEnum | None
                             ) -> WeightsEnum | Path | None:
    """Read ``weights_backbone`` for torchvision model ``backbone`` (e.g. "resnet50"); no download.

    Args:
        backbone: torchvision model name.
        weights: "ResNet50_Weights.IMAGENET1K_V1" (or ``.DEFAULT``), a ``WeightsEnum``
            member, a path to a ``.pth``/``.pt`` state dict, or None.

    Returns:
        The weights enum member (torchvision downloads it when the backbone is built), the
        checkpoint's ``Path``, or None.

    Raises:
        ValueError: an unknown weights name, or weights made for another architecture.
        FileNotFoundError: a checkpoint path that does not exist.
    """
    if weights is None or isinstance(weights, WeightsEnum):
        resolved = weights
    else:
        text = str(weights)
        if isinstance(weights, os.PathLike) or text.endswith((".pth", ".pt")) or os.sep in text:
            path = Path(text).expanduser()
            if path.is_dir():
                raise ValueError(f"weights_backbone: {str(path)!r} is a folder, expected a .pth state dict file")
            if not path.is_file():
                raise FileNotFoundError(f"weights_backbone: no checkpoint file at {str(path)!r}")
            return path
        try:
            resolved = torchvision.models.get_weight(text)
        except (KeyError, ValueError):
            raise ValueError(f"weights_backbone={text!r} is neither a torchvision weights name such as "
                             f"'ResNet50_Weights.IMAGENET1K_V1' nor a path to a .pth file") from None
    if resolved is not None:
        expected = torchvision.models.get_model_weights(backbone)
        if not isinstance(resolved, expected):
            raise ValueError(f"weights_backbone={resolved} does not fit backbone {backbone!r}; expected a member of "
                             f"{expected.__name__}, e.g. {expected.__name__}.DEFAULT")
    return resolved


def _classifier(name: str, weights: WeightsEnum | Path | None, **kwargs: Any) -> nn.Module:
    """The torchvision classification network, with pretrained weights from the zoo or a file."""
    net = torchvision.models.get_model(name, weights=weights if isinstance(weights, WeightsEnum) else None, **kwargs)
    if isinstance(weights, Path):
        try:
            state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... by cause
            raise ValueError(f"weights_backbone={str(weights)!r} cannot be read with weights_only=True: "
                             f"{' '.join(str(exc).split())[:200]}") from None
        if isinstance(state_dict, Mapping) and isinstance(state_dict.get("model"), Mapping):
            state_dict = state_dict["model"]
        if not isinstance(state_dict, Mapping) or not all(torch.is_tensor(value) for value in state_dict.values()):
            raise ValueError(f"weights_backbone={str(weights)!r} holds a {type(state_dict).__name__} that is not a "
                             f"state dict (parameter name -> tensor) of {name}")
        own = net.state_dict()
        # The classifier (fc / classifier) is dropped by the FPN extractor: another class count does not matter.
        state_dict = {key: value for key, value in state_dict.items() if not (
            key.startswith(("fc.", "classifier.")) and key in own and value.shape != own[key].shape)}
        reshaped = [f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}" for key, value in state_dict.items()
                    if key in own and value.shape != own[key].shape]
        if reshaped:  # load_state_dict would raise a RuntimeError listing every one
            raise ValueError(f"weights_backbone={str(weights)!r} is not a {name} state dict: {len(reshaped)} "
                             f"tensors have another shape (file vs {name}), e.g. {', '.join(reshaped[:3])}")
        result = net.load_state_dict(state_dict, strict=False)
        # The classifier (fc / classifier) is dropped by the FPN extractor, so it may be absent.
        missing = [key for key in result.missing_keys if not key.startswith(("fc.", "classifier."))]
        if missing or result.unexpected_keys:
            raise ValueError(f"weights_backbone={str(weights)!r} is not a {name} state dict: missing keys "
                             f"{missing[:5]}, unexpected keys {result.unexpected_keys[:5]}")
    return net


def _check_trainable(trainable_layers: int | None, pretrained: bool, max_value: int, default: int) -> int:
    """torchvision's defaults (all layers from scratch, ``default`` pretrained); explicit values win."""
    if trainable_layers is None:
        return default if pretrained else max_value
    if not 0 <= trainable_layers <= max_value:
        raise ValueError(f"trainable_backbone_layers must be in [0, {max_value}], got {trainable_layers}")
    return trainable_layers


def _resnet_fpn(name: str, *, weights: str | os.PathLike | WeightsEnum | None = None,
                trainable_layers: int | None = None, fpn_channels: int = 256) -> tuple[nn.Module, int]:
    resolved = resolve_backbone_weights(name, weights)
    pretrained = resolved is not None
    # From scratch, BatchNorm must learn its statistics; frozen default statistics would be garbage.
    net = _classifier(name, resolved, norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d)
    trainable_layers = _check_trainable(trainable_layers, pretrained, 5, 3)
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for param_name, parameter in net.named_parameters():
        if not param_name.startswith(tuple(layers_to_train)):
            parameter.requires_grad_(False)
    # C3-C5 as torchvision's RetinaNet (P2 would add 4x the anchors); P6 and P7 from P5.
    in_channels_stage2 = net.inplanes // 8
    in_channels_list = [in_channels_stage2 * 2 ** (level - 1) for level in (2, 3, 4)]
    body = BackboneWithFPN(net, {"layer2": "0", "layer3": "1", "layer4": "2"}, in_channels_list, fpn_channels,
                           extra_blocks=LastLevelP6P7Fp32(fpn_channels, fpn_channels))
    return body, fpn_channels


def _mobilenet_fpn(name: str, *, weights: str | os.PathLike | WeightsEnum | None = None,
                   trainable_layers: int | None = None, fpn_channels: int = 256) -> tuple[nn.Module, int]:
    resolved = resolve_backbone_weights(name, weights)
    pretrained = resolved is not None
    net = _classifier(name, resolved, **({"norm_layer": FrozenBatchNorm2d} if pretrained else {}))
    features = net.features
    # Output stride after each block, read from the conv strides (no private attributes).
    strides, stride = [], 1
    for block in features:
        for module in block.modules():
            if isinstance(module, nn.Conv2d):
                stride *= module.stride[0]
        strides.append(stride)
    # Stages start where the stride changes (torchvision's C0..Cn); freeze from the front.
    stage_starts = [i for i in range(len(features)) if i == 0 or strides[i] != strides[i - 1]] + [len(features) - 1]
    num_stages = len(stage_starts)
    trainable_layers = _check_trainable(trainable_layers, pretrained, num_stages, 3)
    freeze_before = len(features) if trainable_layers == 0 else stage_starts[num_stages - trainable_layers]
    for block in features[:freeze_before]:
        for parameter in block.parameters():
            parameter.requires_grad_(False)
    # The last block at strides 8, 16 and 32 feed the FPN (C3-C5).
    returned = [max(i for i, s in enumerate(strides) if s == target) for target in (8, 16, 32)]
    in_channels_list = [features[i].out_channels for i in returned]
    body = BackboneWithFPN(features, {str(i): str(level) for level, i in enumerate(returned)}, in_channels_list,
                           fpn_channels, extra_blocks=LastLevelP6P7Fp32(fpn_channels, fpn_channels))
    return body, fpn_channels


for _name in ("resnet18", "resnet34", "resnet50", "resnet101"):
    BACKBONES.register(_name)(partial(_resnet_fpn, _name))
BACKBONES.register("mobilenet_v3_large")(partial(_mobilenet_fpn, "mobilenet_v3_large"))
