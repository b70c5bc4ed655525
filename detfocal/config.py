"""Run configuration: YAML files loaded into frozen, validated pydantic models.

One YAML tree per run, with the sections ``model``, ``data``, ``train``, ``eval`` and
``imports`` (see ``configs/shapes_retinanet_r18.yaml`` for every key with a comment).

Loading rules:
    - YAML 1.2 scalars in files and ``--set`` values alike (``parse_override_value``): ``1e-4``
      is a float, only true/false are booleans (``amp: off`` stays "off"), ints are decimal
      (``010`` is ten), and there are no ``<<`` merge keys or dates. A tree of more than
      ``MAX_NODES`` values (an alias counts each time it is used) or ``MAX_DEPTH`` levels is
      refused, so a few hundred bytes of nested aliases (a "billion laughs") cannot expand.
    - ``_base_: other.yaml`` (relative to the file) is loaded first and the file's keys are
      deep-merged over it: mappings merge key by key, anything else (lists included) replaces.
      ``--set key.sub=value`` overrides are merged next, in order, by the same rules.
    - A mapping replaces the one below it instead of merging when it sets ``type`` to another
      value than the one it meets (default included), so ``--set model.head.type=vfl`` drops
      the focal head's alpha and gamma; ``_delete_: true`` in a mapping (mmdetection's marker)
      replaces too.
    - Every key, type and range is checked (nanoGPT's strictness): an unknown key, a wrong type
      or a non-finite float is a one-line ``ValueError`` naming the dotted key, the value and
      what was expected. Missing keys take the defaults below.
    - ``model.head`` holds ``type`` (a ``HEADS`` entry), ``norm`` and the keyword parameters of
      that head, typed by its signature; missing ones take the head's defaults.
    - ``imports`` are imported by ``load_config`` (a file the user chose), never for a dict
      from a checkpoint: nothing read from a checkpoint is imported.

Classes never see a ``Config``: the ``*_kwargs`` functions at the bottom map it to the plain
keyword arguments of ``build_retinanet``, ``CocoDetection``, ``build_transforms``,
``build_optimizer`` and ``build_lr_schedule``.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import os
import re
import reprlib
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, Sequence, TypeVar

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat,
                      PositiveInt, Strict, ValidationError, ValidationInfo, create_model, field_validator)

__all__ = ["Config", "ConfigError", "apply_overrides", "config_from_dict", "config_to_dict", "config_to_yaml",
           "data_paths", "dataset_kwargs", "deep_merge", "import_modules", "load_config", "model_kwargs",
           "optimizer_kwargs", "parse_override_value", "parse_yaml", "scheduler_kwargs", "transform_kwargs"]

MAX_NODES = 100_000  # a config has a few hundred values; more is an alias bomb or a mistake
MAX_DEPTH = 32


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the dotted key, the value and what is expected."""


# ----------------------------------------------------------------------------------------------
# YAML 1.2 (core schema), bounded


class _Loader(yaml.SafeLoader):
    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        # Fail before PyYAML's recursion, and its quadratic scan of nested brackets, run long.
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise yaml.YAMLError(f"more than {MAX_DEPTH} levels of nesting")
        node = super().compose_node(parent, index)
        self.depth -= 1
        return node

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        pass  # no YAML 1.1 merge keys: PyYAML copies their aliased pairs without bound


_Loader.yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers if tag.endswith(":null")]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, _pattern, _first in [
        ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"), ("int", r"[-+]?[0-9]+", "-+0123456789"),
        ("float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
         "-+0123456789.")]:
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), list(_first))
_Loader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node)))
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def _short(value: Any) -> str:
    """A repr of at most 80 characters, in bounded time whatever the size of ``value``."""
    text = _REPR.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_size(tree: Any, where: str) -> None:
    stack, count = [(tree, 0)], 0
    while stack:  # counts a shared (aliased) value each time it appears, and stops at the bound
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES or depth > MAX_DEPTH:
            raise ValueError(f"{where}: more than {MAX_NODES} values or {MAX_DEPTH} levels (nested YAML aliases?)")
        children = node.values() if isinstance(node, Mapping) else node if isinstance(node, (list, tuple)) else ()
        stack.extend((child, depth + 1) for child in children)


def parse_yaml(text: str, where: str = "YAML text") -> Any:
    """Parse YAML 1.2 text with the config loader.

    Raises:
        ValueError: invalid YAML, or more than ``MAX_NODES`` values or ``MAX_DEPTH`` levels.
    """
    try:
        tree = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ValueError(f"{where} is not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    _check_size(tree, where)
    return tree


def parse_override_value(text: str) -> Any:
    """Parse the value of ``--set key=value`` (or an ablation grid value) as YAML 1.2.

    Raises:
        ValueError: the text is not valid YAML.

    Example:
        >>> parse_override_value("1e-1"), parse_override_value("off"), parse_override_value("")
        (0.1, 'off', None)
    """
    return parse_yaml(text, where=f"value {_short(text)}")


# ----------------------------------------------------------------------------------------------
# Files, _base_ and --set


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file and its ``_base_`` chain (each relative to its file) into one merged dict.

    Raises:
        FileNotFoundError: the file or a base file does not exist.
        ValueError: the YAML is invalid, not a mapping, or the ``_base_`` chain has a cycle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise ValueError(f"config {path}: _base_ cycle through {[str(p) for p in _seen]}")
    tree = parse_yaml(path.read_text(encoding="utf-8"), where=f"config {path}")
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ValueError(f"config {path}: expected a mapping at the top level, got {type(tree).__name__}")
    base = tree.pop("_base_", None)
    if base is not None and not isinstance(base, str):
        raise ValueError(f"config {path}: _base_ must be a file name, got {_short(base)}")
    base_tree = {} if base is None else load_yaml_tree(path.parent / base, _seen + (path.resolve(),))
    return deep_merge(base_tree, tree, _default_tree())


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any],
               defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Return ``base`` with ``override`` merged in: mappings recursively, other values replaced.

    A mapping of ``override`` replaces its counterpart instead of merging when it has
    ``_delete_: true`` or another ``type`` (where ``base`` names none, the one in ``defaults``,
    a tree of the same shape). ``_delete_`` keys are dropped.
    """
    merged = dict(base)
    for key, value in override.items():
        old, default = merged.get(key), (defaults or {}).get(key)
        default = default if isinstance(default, Mapping) else {}
        if isinstance(value, Mapping):
            old_type = old.get("type", default.get("type")) if isinstance(old, Mapping) else None
            replace = (not isinstance(old, Mapping) or value.get("_delete_") is True
                       or value.get("type", old_type) != old_type)
            value = deep_merge({} if replace else old, value, default)  # type: ignore[arg-type]
        if key != "_delete_":
            merged[key] = value
    return merged


def apply_overrides(tree: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Merge ``dotted.key=value`` strings into a config dict, in order, by ``deep_merge``'s rules.

    Raises:
        ValueError: an override has no ``=``, its value is not valid YAML, or it descends into
            a key that holds a value rather than a section.
    """
    tree = deep_merge({}, tree)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not key.strip():
            raise ValueError(f"--set {_short(item)}: expected KEY=VALUE with a dotted key, e.g. train.lr=0.02")
        try:
            value = parse_override_value(text)
        except ValueError as exc:
            raise ValueError(f"--set {key.strip()}: {exc}") from None
        node: Any = tree
        for depth, part in enumerate(parts[:-1]):
            node = node.get(part) if isinstance(node, Mapping) else None
            if node is not None and not isinstance(node, Mapping):
                raise ValueError(f"--set {key.strip()}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        for part in reversed(parts):
            value = {part: value}
        tree = deep_merge(tree, value, _default_tree())
    return tree


# ----------------------------------------------------------------------------------------------
# The schema: types and ranges are checked from these annotations; defaults fill missing keys.

_T = TypeVar("_T")
FromList = Annotated[_T, Strict(False)]  # a tuple that takes a YAML list (its items stay strict)
UnitFloat = Annotated[float, Field(ge=0, le=1)]


def _increasing(steps: tuple[int, ...]) -> tuple[int, ...]:
    if list(steps) != sorted(set(steps)):
        raise ValueError("strictly increasing iterations")
    return steps


class _Section(BaseModel):
    # arbitrary_types_allowed: a head's signature may name its own classes.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False,
                              arbitrary_types_allowed=True)


class ModelConfig(_Section):
    type: str = "retinanet"                 # a DETECTORS entry
    backbone: str = "resnet50"              # a BACKBONES entry: resnet18/34/50/101, mobilenet_v3_large
    weights_backbone: str | None = None     # e.g. ResNet50_Weights.IMAGENET1K_V1; None: from scratch
    # A whole detector to start from (fine-tuning): a torchvision RetinaNet state dict, a detfocal
    # checkpoint or best.pth; a classification layer of another class count is re-initialised.
    weights: str | None = None
    trainable_backbone_layers: NonNegativeInt | None = None
    num_classes: PositiveInt | None = None  # foreground classes; None: from the training annotations
    min_size: PositiveInt = 800
    max_size: PositiveInt = 1333
    # One entry per FPN level (P3-P7): an int or a list of sizes in pixels. None: torchvision's
    # default, 32..512 with three octave scales each.
    anchor_sizes: FromList[tuple[PositiveInt | FromList[tuple[PositiveInt, ...]], ...]] | None = None
    aspect_ratios: FromList[tuple[PositiveFloat, ...]] = (0.5, 1.0, 2.0)
    fpn_channels: PositiveInt = 256
    # Anchor assignment (paper, section 4): IoU >= fg is foreground, < bg background, between ignored.
    fg_iou_thresh: Annotated[float, Field(gt=0, le=1)] = 0.5
    bg_iou_thresh: UnitFloat = 0.4
    # The classification head: ``type`` (a HEADS entry), ``norm`` (none, gn or bn; the box
    # subnet's too) and that head's keyword parameters, e.g. the focal head's alpha, gamma
    # (paper, eq. 5), normalization (batch, image or ema) and num_convs (paper: 4).
    head: dict[str, Any] = Field(default_factory=lambda: {"type": "focal"}, validate_default=True)

    @field_validator("type", "backbone")
    @classmethod
    def _registered(cls, value: str, info: ValidationInfo) -> str:
        from detfocal.utils.registry import BACKBONES, DETECTORS
        _registry_entry(DETECTORS if info.field_name == "type" else BACKBONES, value, f"model.{info.field_name}", info)
        return value

    @field_validator("bg_iou_thresh")
    @classmethod
    def _below_fg(cls, value: float, info: ValidationInfo) -> float:
        if value > info.data.get("fg_iou_thresh", 1):
            raise ValueError(f"<= model.fg_iou_thresh ({info.data['fg_iou_thresh']})")
        return value

    @field_validator("head")
    @classmethod
    def _resolve_head(cls, head: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from detfocal.utils.registry import HEADS
        factory = _registry_entry(HEADS, head.get("type", "focal"), "model.head.type", info)
        schema = _signature_schema(factory, _HEAD_BUILD_ARGS, _HEAD_KEYS)
        return _validate(schema, head, "model.head", f" for head type {head.get('type', 'focal')!r}").model_dump()


class SplitConfig(_Section):
    images: str | None = None          # folder that file_name entries are relative to
    annotations: str | None = None     # COCO instances json


class SubsetConfig(_Section):
    """Applied on load to both splits."""
    categories: FromList[tuple[str | int, ...]] | None = None   # names or ids; None keeps all
    max_images: PositiveInt | None = None                       # per split, sampled by train.seed


class AugmentConfig(_Section):
    hflip: UnitFloat = 0.5                                       # probability
    scale_jitter: FromList[tuple[PositiveFloat, PositiveFloat]] | None = None   # (low, high) zoom factors
    photometric: bool = False


class DataConfig(_Section):
    train: SplitConfig = Field(default_factory=SplitConfig)
    val: SplitConfig = Field(default_factory=SplitConfig)
    subset: SubsetConfig = Field(default_factory=SubsetConfig)
    # Parameters of detfocal.data.shapes.generate plus ``root`` (default data/shapes). When set,
    # the dataset is generated if missing and fills the train/val paths that are not given.
    shapes: dict[str, Any] | None = None
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    # DataLoader processes; 0 decodes in the training process; "auto" measures a batch's load
    # time against a step's and starts workers only where they save >= 5% (engine/workers.py).
    workers: NonNegativeInt | Literal["auto"] = "auto"
    skip_bad_images: bool = False      # skip (and count) undecodable images instead of stopping

    @field_validator("shapes")
    @classmethod
    def _shapes_fit_generate(cls, shapes: dict[str, Any] | None) -> dict[str, Any] | None:
        from detfocal.data import shapes as shapes_module
        schema = _signature_schema(shapes_module.generate, ("out_dir",), (("root", (str, DEFAULT_SHAPES_ROOT)),))
        return None if shapes is None else _validate(schema, shapes, "data.shapes").model_dump(exclude_unset=True)


class ScheduleConfig(_Section):
    type: Literal["step", "cosine"] = "step"
    steps: Annotated[FromList[tuple[PositiveInt, ...]], AfterValidator(_increasing)] = ()  # step: lr *= gamma here
    gamma: PositiveFloat = 0.1
    min_lr_factor: UnitFloat = 0.0     # cosine: the final lr is lr * min_lr_factor


class EmaConfig(_Section):
    """An exponential moving average of the weights, used for evaluation and best.pth."""
    decay: Annotated[float, Field(gt=0, lt=1)] = 0.9998
    warmup_iters: NonNegativeInt = 2000    # the decay ramps as decay * (1 - exp(-updates / warmup_iters))


class TrainConfig(_Section):
    epochs: PositiveInt = 12
    batch_size: PositiveInt = 2        # per process: the global batch is batch_size * world size
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 0.01
    momentum: UnitFloat = 0.9          # sgd momentum; adamw beta1
    weight_decay: NonNegativeFloat = 1e-4
    warmup_iters: NonNegativeInt = 500
    warmup_factor: Annotated[float, Field(gt=0, le=1)] = 0.001   # the lr ramps linearly from lr * warmup_factor to lr
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    grad_clip: PositiveFloat | None = None   # max total gradient norm; None: no clipping
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    seed: int = 0
    deterministic: bool = False
    log_interval: PositiveInt = 20     # iterations between metrics.jsonl lines
    max_iters: PositiveInt | None = None   # stop after this many iterations in all (tiny test runs)
    ema: EmaConfig | None = None       # null: no weight averaging
    patience: PositiveInt | None = None    # stop after this many evaluations without a better val AP
    tensorboard: bool = True           # write TensorBoard events to OUT/tensorboard (rank 0)


class EvalConfig(_Section):
    interval: PositiveInt = 1          # epochs between evaluations; the last epoch is always evaluated
    score_thresh: UnitFloat = 0.05
    detections_per_img: PositiveInt = 100
    batch_size: PositiveInt = 4        # per process
    backend: Literal["auto", "pycocotools", "faster_coco_eval"] = "auto"   # auto: faster-coco-eval if installed


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    # Modules that register heads, backbones or detectors; load_config imports them.
    imports: FromList[tuple[Annotated[str, Field(pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")], ...]] = ()


# ----------------------------------------------------------------------------------------------
# Registered types, signatures, and pydantic's errors as one line

_HEAD_BUILD_ARGS = ("in_channels", "num_anchors", "num_classes", "norm_layer")  # build_retinanet passes them
_HEAD_KEYS = (("type", (str, "focal")), ("norm", (Literal["none", "gn", "bn"], "none")))
# Ranges the built-in heads share, so a typo fails at load time; each head checks its own on build.
_PARAMETER_RANGES = {"gamma": Field(ge=0), "beta": Field(ge=0), "num_convs": Field(ge=0),
                     "prior_probability": Field(gt=0, lt=1), "ema_momentum": Field(ge=0, lt=1)}


@functools.cache
def _signature_schema(func: Callable[..., Any], skip: tuple[str, ...], extra: tuple) -> type[BaseModel]:
    """A model of ``extra`` plus ``func``'s keyword parameters, typed by their annotations (or defaults)."""
    try:
        hints = typing.get_type_hints(func.__init__ if isinstance(func, type) else func)
    except Exception:  # an annotation that cannot be evaluated: the default's type decides
        hints = {}
    fields: dict[str, Any] = dict(extra)
    for name, parameter in inspect.signature(func).parameters.items():
        if name not in skip and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            default = ... if parameter.default is parameter.empty else parameter.default
            annotation = hints.get(name, Any if default is None or default is ... else type(default))
            annotation = FromList[annotation] if tuple in (annotation, typing.get_origin(annotation)) else annotation
            fields[name] = (Annotated[annotation, _PARAMETER_RANGES[name]] if name in _PARAMETER_RANGES
                            else annotation, default)
    return create_model(f"{getattr(func, '__name__', 'function')}_parameters", __base__=_Section, **fields)


def _registry_entry(registry: Any, name: Any, key: str, info: ValidationInfo) -> Any:
    if isinstance(name, str) and name in registry:
        return registry.get(name)
    imports, imported = (info.context or {}).get("imports", ()), (info.context or {}).get("imported", True)
    how = (f"the config lists imports {list(imports)}: pass {' '.join('--import ' + m for m in imports)} on the "
           "command line (or use a config file that lists it) to load it" if imports and not imported else
           f"none of the imports {list(imports)} registers it" if imports else
           "pass --import MODULE on the command line (or list it under imports in the config file) to load it")
    raise ConfigError(f"{key}: {_short(name)} is not registered (registered: {registry.names()}); {how}")


_EXPECTED = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str",
             "finite_number": "a finite float", "greater_than": "> {gt:g}", "greater_than_equal": ">= {ge:g}",
             "less_than": "< {lt:g}", "less_than_equal": "<= {le:g}", "dict_type": "a mapping",
             "model_type": "a section (mapping)", "tuple_type": "a list", "literal_error": "{expected}",
             "string_pattern_mismatch": "a module name", "missing": "a value (required)"}


def _one_line(exc: ValidationError, data: Any, schema: Any, prefix: str, where: str) -> str:
    """The first error as one line; a union's errors at the same key are joined with "or"."""
    located = []
    for error in exc.errors():
        parts, node = [], data
        for part in error["loc"]:  # the keys found in ``data``: drops union arms such as 'tuple[int, ...]'
            if (isinstance(node, Mapping) and part in node
                    or isinstance(node, (list, tuple)) and part in range(len(node))):
                parts.append(part)
                node = node[part]
        located.append((tuple(parts) + ((error["loc"][-1],) if error["type"] == "missing" else ()), error))
    deepest = max((parts for parts, _ in located if parts[:len(located[0][0])] == located[0][0]), key=len)
    errors = [error for parts, error in located if parts == deepest]
    key = (prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in deepest)).lstrip(".") or "config"
    if isinstance((errors[0].get("ctx") or {}).get("error"), ConfigError):  # a nested check wrote the line
        return str(errors[0]["ctx"]["error"])
    if errors[0]["type"] == "extra_forbidden":
        for part in deepest[:-1]:
            schema = schema.model_fields[part].annotation
        parent, allowed = key.rpartition(".")[0], list(schema.model_fields)
        close = difflib.get_close_matches(str(deepest[-1]), allowed, n=1)
        hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
        return f"unknown key {key}{where}{hint}; allowed keys in {parent or 'config'}: {', '.join(allowed)}"
    expected = " or ".join(dict.fromkeys(
        str(e["ctx"]["error"]) if e["type"] == "value_error" else  # an AfterValidator's words
        _EXPECTED[e["type"]].format(**e.get("ctx", {})) if e["type"] in _EXPECTED else
        e["msg"].removeprefix("Input should be ") for e in errors))
    return f"{key}: expected {expected}, got {_short(errors[0]['input'])} ({type(errors[0]['input']).__name__})"


def _validate(schema: type[BaseModel], data: Any, prefix: str = "", where: str = "", **context: Any) -> Any:
    try:
        return schema.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, data, schema, prefix, where)) from None


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load, merge, override and validate a config file, importing the modules it lists.

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
    return config_from_dict(load_yaml_tree(path), overrides, allow_imports=True)


def config_from_dict(tree: Mapping[str, Any], overrides: Sequence[str] = (), *, allow_imports: bool = False) -> Config:
    """Validate a plain dict (e.g. a checkpoint's ``config``), after applying ``overrides``.

    Args:
        tree: the config as plain data.
        overrides: ``dotted.key=value`` strings, applied in order.
        allow_imports: import the modules in ``imports``. False (the default) only checks that
            they are module names: a checkpoint must never make us import anything. A head
            they would register is then reported with the ``--import`` that loads it.

    Raises:
        ValueError: an unknown key, a wrong type or an out-of-range value.
    """
    if not isinstance(tree, Mapping):
        raise ValueError(f"config: expected a mapping, got {type(tree).__name__}")
    _check_size(tree, "config")
    tree = apply_overrides(tree, overrides)
    imports = _validate(Config, {"imports": tree.get("imports", ())}).imports  # checked as data first
    if allow_imports:
        import_modules(imports)
    return _validate(Config, tree, imports=imports, imported=allow_imports)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain dicts, lists and scalars: YAML- and ``weights_only``-safe."""
    return cfg.model_dump(mode="json")


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text, in schema order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


@functools.cache
def _default_tree() -> dict[str, Any]:
    return Config().model_dump()


def import_modules(names: Sequence[str]) -> None:
    """Import modules so the heads, backbones and detectors they register can be built (``--import``).

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

    With ``data.shapes`` set, ``shapes.generate(root, **params)`` writes the dataset unless it
    is there with the same parameters, and its paths fill the ``data.train``/``data.val``
    entries left null. Relative paths are relative to the working directory.

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
    """Keyword arguments of the ``model.type`` builder (``build_retinanet``): every ``model`` key but
    ``type`` and ``weights`` (loaded by the training loop after the build)."""
    model = {key: value for key, value in config_to_dict(cfg)["model"].items()
             if key not in ("type", "num_classes", "weights")}
    return {"num_classes": num_classes, **model, "score_thresh": cfg.eval.score_thresh,
            "detections_per_img": cfg.eval.detections_per_img}


def optimizer_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of ``engine.build_optimizer`` (besides the model)."""
    train = cfg.train
    return {"name": train.optimizer, "lr": train.lr, "momentum": train.momentum, "weight_decay": train.weight_decay}


def scheduler_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of ``engine.optim.build_lr_schedule`` (besides total_iters)."""
    train = cfg.train
    return {"warmup_iters": train.warmup_iters, "warmup_factor": train.warmup_factor,
            "schedule": train.schedule.type, "steps": list(train.schedule.steps), "gamma": train.schedule.gamma,
            "min_lr_factor": train.schedule.min_lr_factor}
