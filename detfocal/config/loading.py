"""Loading a run's config: the file and its ``_base_`` chain, ``--set`` overrides, imports, validation."""
from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from detfocal.config.errors import short, validate
from detfocal.config.parsing import MAX_DEPTH, check_tree, parse_override_value, parse_yaml
from detfocal.config.schema import Config
from detfocal.configs import resolve_config_path

__all__ = ["apply_overrides", "config_from_dict", "config_to_dict", "config_to_yaml", "deep_merge", "import_modules",
           "load_config", "load_yaml_tree"]

logger = logging.getLogger(__name__)


def _read_text(path: Path, role: str) -> str:
    """The UTF-8 text of a config file; ``role`` says what it is in messages (``"config file"``)."""
    if path.is_dir():
        raise IsADirectoryError(f"{role} {path} is a directory; expected a YAML file")
    if not path.exists():
        raise FileNotFoundError(f"{role} {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{role} {path} is not a regular file; expected a YAML file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{role} {path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); "
                         "expected a YAML file") from None


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file and its ``_base_`` chain (each relative to its file) into one merged dict.

    Raises:
        FileNotFoundError: the file or a base file does not exist.
        IsADirectoryError: the file or a base file is a directory.
        ValueError: the file is not UTF-8 text, its YAML is invalid or not a mapping, or the
            ``_base_`` chain has a cycle.
    """
    path = Path(path)
    text = _read_text(path, "config file" if not _seen else f"_base_ of config {_seen[-1]}:")
    if path.resolve() in _seen:
        raise ValueError(f"config {path}: _base_ cycle through {[str(p) for p in _seen]}")
    tree = parse_yaml(text, where=f"config {path}")
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ValueError(f"config {path}: expected a mapping at the top level, got {type(tree).__name__}")
    base = tree.pop("_base_", None)
    if base is not None and not isinstance(base, str):
        raise ValueError(f"config {path}: _base_ must be a file name, got {short(base)}")
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
        ValueError: an override has no ``=``, a key of more than ``MAX_DEPTH`` parts, a value
            that is not valid YAML, or it descends into a key that holds a value rather than a
            section.
    """
    tree = deep_merge({}, tree)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {short(item)}: expected KEY=VALUE with a dotted key, e.g. train.lr=0.02")
        parts = key.split(".")
        if len(parts) > MAX_DEPTH:  # the deepest config key has a few parts; merging more would recurse as deep
            raise ValueError(f"--set {short(key)}: a key of {len(parts)} dotted parts, deeper than any config key "
                             f"(at most {MAX_DEPTH} levels)")
        try:
            value = parse_override_value(text)
        except ValueError as exc:
            raise ValueError(f"--set {key}: {exc}") from None
        node: Any = tree
        for depth, part in enumerate(parts[:-1]):
            node = node.get(part) if isinstance(node, Mapping) else None
            if node is not None and not isinstance(node, Mapping):
                raise ValueError(f"--set {key}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        for part in reversed(parts):
            value = {part: value}
        tree = deep_merge(tree, value, _default_tree())
    return tree


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load, merge, override and validate a config file, importing the modules it lists.

    Args:
        path: the YAML file.
        overrides: ``dotted.key=value`` strings, applied in order.

    Returns:
        The frozen ``Config``.

    Raises:
        FileNotFoundError: the file or its ``_base_`` does not exist.
        IsADirectoryError: the file or its ``_base_`` is a directory.
        ValueError: bad YAML, an unknown key, a wrong type or an out-of-range value; the message
            names the dotted key.

    Example:
        >>> cfg = load_config("configs/shapes_retinanet_r18.yaml", ["train.lr=0.02"])
        >>> cfg.train.lr
        0.02
    """
    return config_from_dict(load_yaml_tree(resolve_config_path(path)), overrides, allow_imports=True)


def config_from_dict(tree: Mapping[str, Any], overrides: Sequence[str] = (), *, allow_imports: bool = False) -> Config:
    """Validate a plain dict (e.g. a checkpoint's ``config``), after applying ``overrides``.

    Args:
        tree: the config as plain data.
        overrides: ``dotted.key=value`` strings, applied in order.
        allow_imports: import the modules in ``imports``. False (the default) only checks that
            they are module names: a checkpoint must never make us import anything.

    Raises:
        ValueError: an unknown key, a wrong type or an out-of-range value.
    """
    if not isinstance(tree, Mapping):
        raise ValueError(f"config: expected a mapping, got {type(tree).__name__}")
    check_tree(tree, "config")
    tree = apply_overrides(tree, overrides)
    imports = validate(Config, {"imports": tree.get("imports", ())}).imports  # checked as data first
    if allow_imports:
        import_modules(imports)
    return validate(Config, tree)


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
        ValueError: a module cannot be imported, or raised while it ran (a syntax error, a
            failing registration): the message names the module and the error's type.
    """
    if names and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # the user's module: any error in it is theirs to fix, not a bug of ours
            logger.debug("importing %s failed", name, exc_info=True)
            raise ValueError(f"imports: cannot import {name!r} ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]})") from None
