"""Run configuration: YAML files loaded into frozen, validated dataclasses.

One YAML tree per run, with the sections ``model``, ``data``, ``train``, ``eval`` and
``imports`` (see ``configs/shapes_retinanet_r18.yaml`` for every key with a comment).

Loading rules:
    - ``_base_: other.yaml`` (relative to the file) is loaded first and the file's own keys are
      deep-merged over it: dicts merge key by key, anything else (lists included) replaces.
    - Overrides ``key.sub=value`` are applied next; each value is parsed as YAML, so
      ``data.subset.categories=[person,dog]`` gives a list and ``model.weights_backbone=`` gives null.
    - Every key and type is checked (nanoGPT's strictness): an unknown key or a wrong type is a
      ``ValueError`` naming the dotted key and what is allowed. Missing keys take the defaults below.
    - The modules in ``imports`` are imported while loading, so that ``model.head`` can be checked
      against the head type they register.

Classes never see a ``Config``: the ``*_kwargs`` functions at the bottom map it to the plain
keyword arguments of ``build_retinanet``, ``CocoDetection``, ``build_transforms``,
``build_optimizer`` and ``build_scheduler``.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from detfocal.strict_yaml import (apply_overrides, build_dataclass, check_value, deep_merge, load_yaml_tree, parse_yaml,
                                  to_plain)

__all__ = ["Config", "apply_overrides", "config_from_dict", "config_to_dict", "config_to_yaml", "data_paths",
           "dataset_kwargs", "deep_merge", "import_modules", "load_config", "model_kwargs", "optimizer_kwargs",
           "parse_yaml", "resolve_head", "scheduler_kwargs", "transform_kwargs"]


# ----------------------------------------------------------------------------------------------
# The schema. Types are checked from these annotations; defaults fill missing keys.


@dataclass(frozen=True)
class ModelConfig:
    type: str = "retinanet"                 # a DETECTORS entry
    backbone: str = "resnet50"              # a BACKBONES entry: resnet18/34/50/101, mobilenet_v3_large
    weights_backbone: str | None = None     # e.g. ResNet50_Weights.IMAGENET1K_V1; None: from scratch
    trainable_backbone_layers: int | None = None
    num_classes: int | None = None          # foreground classes; None: from the training annotations
    min_size: int = 800
    max_size: int = 1333
    # One entry per FPN level (P3-P7): an int or a list of sizes in pixels. None: torchvision's
    # default, 32..512 with three octave scales each.
    anchor_sizes: tuple[int | tuple[int, ...], ...] | None = None
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    fpn_channels: int = 256
    # Anchor assignment (paper, section 4): IoU >= fg is foreground, < bg background, between ignored.
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.4
    # The classification head: ``type`` (a HEADS entry), ``norm`` (none, gn or bn; it also
    # applies to the box-regression subnet) and the keyword parameters of that head, checked
    # against its signature; missing ones take the head's defaults. The focal head's: alpha
    # (weight of the positives; null: none), gamma (paper, eq. 5), normalization ("batch":
    # foreground anchors of the global batch, "image": torchvision's per-image rule, "ema":
    # detectron2's running average), num_convs (depth of the conv tower, paper: 4), ...
    head: dict[str, Any] = field(default_factory=lambda: {"type": "focal", "norm": "none"})


@dataclass(frozen=True)
class SplitConfig:
    images: str | None = None          # folder that file_name entries are relative to
    annotations: str | None = None     # COCO instances json


@dataclass(frozen=True)
class SubsetConfig:
    """Applied on load to both splits."""
    categories: tuple[str | int, ...] | None = None   # names or ids; None keeps all
    max_images: int | None = None                     # per split, sampled by train.seed


@dataclass(frozen=True)
class AugmentConfig:
    hflip: float = 0.5
    scale_jitter: tuple[float, float] | None = None   # (low, high) zoom factors
    photometric: bool = False


@dataclass(frozen=True)
class DataConfig:
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    # Parameters of detfocal.data.shapes.generate plus ``root`` (default data/shapes). When set,
    # the dataset is generated if missing and fills the train/val paths that are not given.
    shapes: dict[str, Any] | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    workers: int = 2


@dataclass(frozen=True)
class ScheduleConfig:
    type: Literal["step", "cosine"] = "step"
    steps: tuple[int, ...] = ()        # step: iterations where the lr is multiplied by gamma
    gamma: float = 0.1
    min_lr_factor: float = 0.0         # cosine: the final lr is lr * min_lr_factor


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    batch_size: int = 2                # per process: the global batch is batch_size * world size
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9              # sgd momentum; adamw beta1
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_factor: float = 0.001       # the lr ramps linearly from lr * warmup_factor to lr
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    grad_clip: float | None = None     # max total gradient norm; None: no clipping
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    seed: int = 0
    deterministic: bool = False
    log_interval: int = 20             # iterations between metrics.jsonl lines
    max_iters: int | None = None       # stop after this many iterations in all (tiny test runs)


@dataclass(frozen=True)
class EvalConfig:
    interval: int = 1                  # epochs between evaluations; the last epoch is always evaluated
    score_thresh: float = 0.05
    detections_per_img: int = 100
    batch_size: int = 4                # per process


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    imports: tuple[str, ...] = ()       # modules to import so their registered heads can be built


# Value checks that the types cannot express, as (dotted key, predicate, what is expected).
_RANGES: list[tuple[str, Any, str]] = [
    ("model.min_size", lambda v: v > 0, "> 0"),
    ("model.max_size", lambda v: v > 0, "> 0"),
    ("model.fpn_channels", lambda v: v > 0, "> 0"),
    ("model.num_classes", lambda v: v is None or v > 0, "> 0 or null"),
    ("model.fg_iou_thresh", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("model.bg_iou_thresh", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("data.workers", lambda v: v >= 0, ">= 0"),
    ("data.subset.max_images", lambda v: v is None or v > 0, "> 0 or null"),
    ("train.epochs", lambda v: v > 0, "> 0"),
    ("train.batch_size", lambda v: v > 0, "> 0"),
    ("train.lr", lambda v: v > 0, "> 0"),
    ("train.weight_decay", lambda v: v >= 0, ">= 0"),
    ("train.warmup_iters", lambda v: v >= 0, ">= 0"),
    ("train.warmup_factor", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("train.schedule.steps", lambda v: list(v) == sorted(v) and all(s > 0 for s in v), "increasing positive iterations"),
    ("train.grad_clip", lambda v: v is None or v > 0, "> 0 or null"),
    ("train.log_interval", lambda v: v > 0, "> 0"),
    ("train.max_iters", lambda v: v is None or v > 0, "> 0 or null"),
    ("eval.interval", lambda v: v > 0, "> 0"),
    ("eval.detections_per_img", lambda v: v > 0, "> 0"),
    ("eval.batch_size", lambda v: v > 0, "> 0"),
]


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load, merge, override and validate a config file.

    Args:
        path: the YAML file.
        overrides: ``dotted.key=value`` strings, applied in order.

    Returns:
        The frozen ``Config``.

    Raises:
        FileNotFoundError: the file or its ``_base_`` does not exist.
        ValueError: bad YAML, an unknown key, a wrong type or an out-of-range value; the message
            names the dotted key.

    Example:
        >>> cfg = load_config("configs/shapes_retinanet_r18.yaml", ["train.lr=0.02"])
        >>> cfg.train.lr
        0.02
    """
    return config_from_dict(apply_overrides(load_yaml_tree(path), overrides))


def config_from_dict(tree: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """Validate a plain dict (e.g. a checkpoint's ``config``), after applying ``overrides``.

    Raises:
        ValueError: an unknown key, a wrong type or an out-of-range value.
    """
    if not isinstance(tree, Mapping):
        raise ValueError(f"config: expected a mapping, got {type(tree).__name__}")
    cfg = build_dataclass(Config, apply_overrides(tree, overrides))
    import_modules(cfg.imports)  # before the head check: they may register its type
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, head=resolve_head(cfg.model.head)))
    for key, ok, expected in _RANGES:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if not ok(value):
            raise ValueError(f"{key}: expected {expected}, got {value!r}")
    if cfg.model.bg_iou_thresh > cfg.model.fg_iou_thresh:
        raise ValueError(f"model.bg_iou_thresh: expected <= model.fg_iou_thresh ({cfg.model.fg_iou_thresh}), "
                         f"got {cfg.model.bg_iou_thresh}")
    if cfg.data.shapes is not None:
        _check_shapes_keys(cfg.data.shapes)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain dicts, lists and scalars: YAML- and ``weights_only``-safe."""
    return to_plain(dataclasses.asdict(cfg))


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text, in schema order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


# What build_retinanet passes to every head itself; a config may not set them.
_HEAD_BUILD_ARGS = ("in_channels", "num_anchors", "num_classes", "norm_layer")
# Ranges of the focal-family parameters, checked here so a typo fails at load time, not at build.
_HEAD_RANGES = {"gamma": (lambda v: v >= 0, ">= 0"), "beta": (lambda v: v >= 0, ">= 0"),
                "num_convs": (lambda v: v >= 0, ">= 0"),
                "alpha": (lambda v: v is None or v == -1 or 0 <= v <= 1, "in [0, 1], -1 or null")}


def resolve_head(head: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``model.head`` against its registered type and fill in that head's defaults.

    Returns:
        ``{"type", <every keyword parameter of the head, given or default>, "norm"}``.

    Raises:
        ValueError: an unregistered type (the message lists the registered ones), an unknown
            parameter (listing the allowed ones), or a value of the wrong type or range.
    """
    import detfocal  # noqa: F401  (registers the built-in heads)
    from detfocal.registry import HEADS

    head = dict(head)
    head_type, norm = head.pop("type", "focal"), head.pop("norm", "none")
    if not isinstance(head_type, str) or head_type not in HEADS:
        raise ValueError(f"model.head.type: unknown head {head_type!r}; registered: {', '.join(HEADS.names())} "
                         f"(a module that registers another one goes in imports)")
    if norm not in ("none", "gn", "bn"):
        raise ValueError(f"model.head.norm: expected one of 'none', 'gn', 'bn', got {norm!r}")
    factory = HEADS.get(head_type)
    parameters = {name: p for name, p in inspect.signature(factory).parameters.items()
                  if name not in _HEAD_BUILD_ARGS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    try:
        hints = typing.get_type_hints(factory.__init__ if isinstance(factory, type) else factory)
    except Exception:  # an annotation that cannot be evaluated: check names only
        hints = {}
    unknown = [key for key in head if key not in parameters]
    if unknown:
        raise ValueError(f"unknown key model.head.{unknown[0]} for head type {head_type!r}; allowed keys in "
                         f"model.head: type, {', '.join(parameters)}, norm")
    resolved: dict[str, Any] = {"type": head_type}
    for name, parameter in parameters.items():
        if name not in head:
            if parameter.default is not parameter.empty:
                resolved[name] = parameter.default
            continue
        value = head[name]
        if name in hints:
            try:
                value = check_value(value, hints[name], f"model.head.{name}")
            except TypeError:  # an annotation strict_yaml does not model: take the value as given
                pass
        ok, expected = _HEAD_RANGES.get(name, (lambda v: True, ""))
        if not ok(value):
            raise ValueError(f"model.head.{name}: expected {expected}, got {value!r}")
        resolved[name] = value
    resolved["norm"] = norm
    return resolved


def _check_shapes_keys(shapes: Mapping[str, Any]) -> None:
    """``data.shapes`` takes ``root`` plus the parameters of ``shapes.generate`` (types from its defaults)."""
    from detfocal.data import shapes as shapes_module

    parameters = inspect.signature(shapes_module.generate).parameters
    allowed = {"root": ""} | {name: p.default for name, p in parameters.items() if name != "out_dir"}
    for key, value in shapes.items():
        if key not in allowed:
            raise ValueError(f"unknown key data.shapes.{key}; allowed keys in data.shapes: {', '.join(allowed)}")
        default = allowed[key]
        if default is None or default is inspect.Parameter.empty:
            continue
        expected: Any = (int, float) if isinstance(default, float) else type(default)
        if isinstance(default, (tuple, list)):
            expected = (tuple, list)
        if not isinstance(value, expected) or (isinstance(value, bool) and not isinstance(default, bool)):
            raise ValueError(f"data.shapes.{key}: expected {type(default).__name__} like {default!r}, got {value!r}")


def import_modules(names: Sequence[str]) -> None:
    """Import the config's ``imports`` so the heads and detectors they register can be built.

    The working directory is put on ``sys.path`` first, so a module next to the config's user
    can be named without installing it.

    Raises:
        ValueError: a module cannot be imported (the message names it and the import error).
    """
    if names and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(f"imports: cannot import {name!r} ({exc})") from None


# ----------------------------------------------------------------------------------------------
# Config -> plain keyword arguments. Classes and builders never see a Config.

DEFAULT_SHAPES_ROOT = "data/shapes"


def data_paths(data: DataConfig, *, generate: bool = True) -> dict[str, tuple[str, str]]:
    """``{"train": (images, annotations), "val": (...)}``, generating the shapes data if configured.

    With ``data.shapes`` set, ``shapes.generate(root, **params)`` writes the dataset when its
    files are missing or were made with other parameters (it is idempotent), and its paths
    fill every ``data.train``/``data.val`` entry left null. Relative paths are relative to the
    working directory.

    Args:
        data: the ``data`` section.
        generate: False only resolves the paths (for processes that wait for rank 0).

    Raises:
        ValueError: a split has no images or annotations path and no shapes section fills it.
    """
    generated: dict[str, Any] = {}
    if data.shapes is not None:
        from detfocal.data import shapes as shapes_module

        params = dict(data.shapes)
        root = Path(params.pop("root", DEFAULT_SHAPES_ROOT))
        if generate:
            generated = {key: str(value) for key, value in shapes_module.generate(root, **params).items()}
        else:
            generated = {f"{split}_images": str(root / split) for split in ("train", "val")}
            generated |= {f"{split}_annotations": str(root / "annotations" / f"instances_{split}.json")
                          for split in ("train", "val")}
    paths = {}
    for split in ("train", "val"):
        given: SplitConfig = getattr(data, split)
        images = given.images or generated.get(f"{split}_images")
        annotations = given.annotations or generated.get(f"{split}_annotations")
        if images is None or annotations is None:
            raise ValueError(f"data.{split}: needs 'images' and 'annotations' paths (or a data.shapes section), "
                             f"got images={given.images!r}, annotations={given.annotations!r}")
        paths[split] = (images, annotations)
    return paths


def dataset_kwargs(cfg: Config, images: str, annotations: str) -> dict[str, Any]:
    """Keyword arguments of ``CocoDetection`` (without transforms) for one split."""
    return {"images_dir": images, "annotation_file": annotations,
            "categories": None if cfg.data.subset.categories is None else list(cfg.data.subset.categories),
            "max_images": cfg.data.subset.max_images, "seed": cfg.train.seed}


def transform_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of ``build_transforms`` for training."""
    augment = cfg.data.augment
    return {"hflip": augment.hflip, "photometric": augment.photometric,
            "scale_jitter": None if augment.scale_jitter is None else tuple(augment.scale_jitter)}


def model_kwargs(cfg: Config, num_classes: int) -> dict[str, Any]:
    """Keyword arguments of the ``model.type`` builder (``build_retinanet``)."""
    model = cfg.model
    return {
        "num_classes": num_classes, "backbone": model.backbone, "weights_backbone": model.weights_backbone,
        "trainable_backbone_layers": model.trainable_backbone_layers, "fpn_channels": model.fpn_channels,
        "anchor_sizes": to_plain(model.anchor_sizes), "aspect_ratios": list(model.aspect_ratios),
        "min_size": model.min_size, "max_size": model.max_size, "head": dict(model.head),
        "fg_iou_thresh": model.fg_iou_thresh, "bg_iou_thresh": model.bg_iou_thresh,
        "score_thresh": cfg.eval.score_thresh, "detections_per_img": cfg.eval.detections_per_img,
    }


def optimizer_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of ``engine.build_optimizer`` (besides the model)."""
    train = cfg.train
    return {"name": train.optimizer, "lr": train.lr, "momentum": train.momentum, "weight_decay": train.weight_decay}


def scheduler_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of ``engine.build_scheduler`` (besides the optimizer and total_iters)."""
    train = cfg.train
    return {"warmup_iters": train.warmup_iters, "warmup_factor": train.warmup_factor,
            "schedule": train.schedule.type, "steps": list(train.schedule.steps), "gamma": train.schedule.gamma,
            "min_lr_factor": train.schedule.min_lr_factor}
