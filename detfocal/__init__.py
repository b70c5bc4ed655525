"""detfocal: a sigmoid focal-loss classification head for torchvision RetinaNet detectors.

The package is laid out along the data flow: :mod:`detfocal.config` -> :mod:`detfocal.data`
-> :mod:`detfocal.modeling` (backbone -> FPN -> head) -> :mod:`detfocal.losses` ->
:mod:`detfocal.engine` -> :mod:`detfocal.evaluation`.

``import detfocal`` is cheap: the names below load their module (and torch) on first use
(PEP 562). The registries import their built-in heads, backbones and detectors on first lookup.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.3.0"

# public name -> module that defines it
_LAZY = {
    "BACKBONES": "detfocal.utils.registry", "DETECTORS": "detfocal.utils.registry", "HEADS": "detfocal.utils.registry",
    "Registry": "detfocal.utils.registry",
    "SigmoidFocalLoss": "detfocal.losses", "sigmoid_focal_loss": "detfocal.losses",
    "softmax_focal_loss": "detfocal.losses",
    "FocalClassificationHead": "detfocal.modeling", "focal_head_loss": "detfocal.modeling",
    "labels_from_matched_idxs": "detfocal.modeling", "FocalRetinaNet": "detfocal.modeling",
    "build_retinanet": "detfocal.modeling", "convert_retinanet": "detfocal.modeling",
    "load_config": "detfocal.config",
    "train": "detfocal.engine.train", "load_model": "detfocal.engine.loading",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'detfocal' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
