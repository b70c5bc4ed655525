"""Strict YAML configs: parse, inherit (``_base_``), override (``a.b=value``) and check types.

The machinery behind ``detfocal.config``, independent of its schema: a YAML tree becomes a
frozen dataclass whose field annotations are the types. Every unknown key and every value of
the wrong type is a ``ValueError`` naming the dotted key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: ``1e-4`` is a float (PyYAML alone makes it a string) and
    only true/false are booleans (PyYAML alone reads ``amp: off`` as False)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML text with the config loader (``1e-4`` is a float)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


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
    try:
        tree = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"config {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ValueError(f"config {path}: expected a mapping at the top level, got {type(tree).__name__}")
    base = tree.pop("_base_", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ValueError(f"config {path}: _base_ must be a file name, got {base!r}")
    return deep_merge(load_yaml_tree(path.parent / base, _seen + (path.resolve(),)), tree)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``override`` merged in: dicts recursively, other values replaced.

    A dict that names a different ``type`` than the one it overrides replaces it whole: the
    parameters of one registered type mean nothing to another (mmdetection's ``_delete_``,
    implied).
    """
    merged = dict(base)
    for key, value in override.items():
        old = merged.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping) and value.get("type", old.get("type")) == old.get("type"):
            merged[key] = deep_merge(old, value)
        else:
            merged[key] = value
    return merged


def apply_overrides(tree: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` strings to a config dict; each value is parsed as YAML.

    Raises:
        ValueError: an override has no ``=``, its value is not valid YAML, or it descends into
            a key that holds a value rather than a section.
    """
    tree = deep_merge({}, tree)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=0.02")
        try:
            value = parse_yaml(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {key}: {text!r} is not valid YAML ({' '.join(str(exc).split())})") from None
        *parents, leaf = key.split(".")
        node: Any = tree
        for depth, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ValueError(f"--set {key}: {'.'.join(parents[:depth + 1])} is a value, not a section")
            else:
                child = node[part] = dict(child)
            node = child
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            value = deep_merge(node[leaf], value)
        node[leaf] = value
    return tree


def to_plain(value: Any) -> Any:
    """Tuples to lists and keys to strings, recursively: YAML- and ``weights_only``-safe data."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def build_dataclass(cls: type, tree: Any, prefix: str = "") -> Any:
    """Build the (nested) dataclass ``cls`` from a dict, checking every key and value.

    Values are checked against the field annotations: bool, int, float (an int is accepted),
    str, None, ``Literal[...]``, unions, ``tuple[X, ...]`` and ``tuple[X, Y]`` (from YAML lists),
    ``dict[str, Any]`` and nested dataclasses. Missing keys keep the field defaults.

    Raises:
        ValueError: an unknown key (with a close match and the allowed keys) or a wrong type,
            naming the dotted key, e.g. ``train.lr: expected float, got 'fast' (str)``.
    """
    where = prefix.rstrip(".") or "config"
    if not isinstance(tree, Mapping):
        raise ValueError(f"{where}: expected a section (mapping), got {tree!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [key for key in tree if key not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise ValueError(f"unknown key {prefix}{key}{hint}; allowed keys in {where}: {', '.join(fields)}")
    values = {name: _coerce(tree[name], hints[name], prefix + name) for name in fields if name in tree}
    return cls(**values)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return "a section" if dataclasses.is_dataclass(tp) else tp.__name__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            inner = _type_name(args[0])
            return f"a list of ({inner})" if " or " in inner else f"a list of {inner}"
        return f"a list [{', '.join(map(_type_name, args))}]"
    return str(tp)


_SCALARS: dict[Any, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,),
                                         type(None): (type(None),)}


def check_value(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the type annotation ``tp``; return it converted (lists -> tuples).

    Raises:
        ValueError: a wrong type, naming ``key``.
        TypeError: ``tp`` is an annotation this module does not check (a schema bug).
    """
    return _coerce(value, tp, key)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    wrong = ValueError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key + ".")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _coerce(value, arm, key)
            except ValueError:
                continue
        raise wrong
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise wrong
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise wrong
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise wrong
        return {str(k): v for k, v in value.items()}
    if tp in _SCALARS:
        # bool is a subclass of int, but `epochs: true` is a mistake, not 1.
        if isinstance(value, _SCALARS[tp]) and (tp is bool or not isinstance(value, bool)):
            return float(value) if tp is float else value
        raise wrong
    raise TypeError(f"config schema: unsupported annotation {tp!r} for {key}")  # a bug, not a user error
