"""The config's ``model`` section checked against the registered detectors, backbones and heads.

The config layer checks what its own values decide; whether ``model.type``, ``model.backbone``
and ``model.head.type`` are registered, and whether the head's parameters fit its signature,
needs the model code, so it is checked here, before any data is generated or read. The
messages read like the config's own: one line naming the dotted key.
"""
from __future__ import annotations

import functools
import inspect
import sys
import types
import typing
from typing import Any, Callable, Literal, Mapping, Sequence

from pydantic import BaseModel, Field, create_model

from detfocal.config.errors import ConfigError, short, validate
from detfocal.config.schema import MAX_ITEMS, FromList, Section
from detfocal.utils.registry import BACKBONES, DETECTORS, HEADS, Registry

__all__ = ["check_model_config"]

HEAD_BUILD_ARGS = ("in_channels", "num_anchors", "num_classes", "norm_layer")  # build_retinanet passes them
_HEAD_KEYS = (("type", (str, "focal")), ("norm", (Literal["none", "gn", "bn"], "none")))
# Ranges the built-in heads share, so a typo fails before training; each head checks its own on build.
_PARAMETER_RANGES = {"gamma": Field(ge=0), "beta": Field(ge=0), "num_convs": Field(ge=0, le=MAX_ITEMS),
                     "prior_probability": Field(gt=0, lt=1), "ema_momentum": Field(ge=0, lt=1)}


def check_model_config(model: Mapping[str, Any], *, imports: Sequence[str] = ()) -> None:
    """Check the ``model`` section against the registries and the head's signature.

    Args:
        model: the ``model`` section as plain data, ``config_to_dict(cfg)["model"]``.
        imports: the config's ``imports``: an unregistered type is reported with the
            ``--import`` that would register it, or as registered by none of them once all
            are imported.

    Raises:
        ValueError: one line naming the key, e.g. ``model.head.gamma: expected >= 0, got -1
            (int)`` or ``model.backbone: 'resnet9' is not registered (registered: [...]); ...``.

    Example:
        >>> check_model_config(config_to_dict(cfg)["model"], imports=cfg.imports)
    """
    _registered(DETECTORS, model.get("type"), "model.type", imports)
    _registered(BACKBONES, model.get("backbone"), "model.backbone", imports)
    head = dict(model.get("head") or {})
    head_type = head.get("type", "focal")
    schema = _signature_schema(_registered(HEADS, head_type, "model.head.type", imports), HEAD_BUILD_ARGS, _HEAD_KEYS)
    validate(schema, head, "model.head", f" for head type {head_type!r}")


def _registered(registry: Registry, name: Any, key: str, imports: Sequence[str]) -> Callable[..., Any]:
    if isinstance(name, str) and name in registry:
        return registry.get(name)
    imported = all(module in sys.modules for module in imports)
    how = (f"the config lists imports {list(imports)}: pass {' '.join('--import ' + m for m in imports)} on the "
           "command line (or use a config file that lists it) to load it" if imports and not imported else
           f"none of the imports {list(imports)} registers it" if imports else
           "pass --import MODULE on the command line (or list it under imports in the config file) to load it")
    raise ConfigError(f"{key}: {short(name)} is not registered (registered: {registry.names()}); {how}")


def _type_hints(func: Callable[..., Any]) -> dict[str, Any]:
    """``func``'s annotations, evaluated one by one: one that cannot be (a name imported only for
    type checkers) becomes ``Any`` without losing the others."""
    target = func.__init__ if isinstance(func, type) else func
    try:
        return typing.get_type_hints(target)
    except Exception:
        pass
    namespace = getattr(inspect.unwrap(target), "__globals__", {})
    hints = {}
    for name, annotation in getattr(target, "__annotations__", {}).items():
        try:
            hints[name] = typing.get_type_hints(types.SimpleNamespace(__annotations__={name: annotation}),
                                                globalns=namespace)[name]
        except Exception:
            hints[name] = Any
    return hints


@functools.cache
def _signature_schema(func: Callable[..., Any], skip: tuple[str, ...], extra: tuple) -> type[BaseModel]:
    """A model of ``extra`` plus ``func``'s keyword parameters, typed by their annotations (or defaults)."""
    hints = _type_hints(func)
    fields: dict[str, Any] = dict(extra)
    for name, parameter in inspect.signature(func).parameters.items():
        if name not in skip and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            default = ... if parameter.default is parameter.empty else parameter.default
            annotation = hints.get(name, Any if default is None or default is ... else type(default))
            annotation = FromList[annotation] if tuple in (annotation, typing.get_origin(annotation)) else annotation
            fields[name] = (typing.Annotated[annotation, _PARAMETER_RANGES[name]] if name in _PARAMETER_RANGES
                            else annotation, default)
    return create_model(f"{getattr(func, '__name__', 'function')}_parameters", __base__=Section, **fields)
