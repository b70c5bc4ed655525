"""YAML 1.2 (core schema), bounded: the parser of config files and ``--set`` values.

PyYAML speaks YAML 1.1, where ``off`` is a boolean, ``010`` is octal and ``<<`` merges
mappings. The loader here keeps only YAML 1.2's core scalars, refuses duplicate keys (1.2
forbids them; PyYAML keeps the last and silently drops the first section) and bounds what a
few hundred bytes can expand to: nested aliases (a "billion laughs"), deep nesting, and
integers too long for Python to convert quickly.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import yaml

from detfocal.config.errors import short

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "MAX_NODES", "check_tree", "parse_override_value", "parse_yaml"]

MAX_NODES = 100_000  # a config has a few hundred values; more is an alias bomb or a mistake
MAX_DEPTH = 32
# 2**64 has 20 digits and every integer key is bounded far below; Python's own cap (4300 digits)
# fails with a message that names neither the key nor the file.
MAX_INT_DIGITS = 20


class _LongInteger:
    """An integer literal of more than ``MAX_INT_DIGITS`` digits, left unconverted until ``check_tree``
    refuses it with its key."""

    def __init__(self, sign: str, digits: str) -> None:
        self.sign, self.digits = sign, digits

    def __repr__(self) -> str:
        return f"{self.sign}{self.digits[:20]}...{self.digits[-4:]} ({len(self.digits)} digits)"


class _DuplicateKey(yaml.YAMLError):
    pass


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

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_nodes: dict[Any, yaml.Node] = {}
        seen: set[int] = set()  # the same node twice is an alias used as a key twice
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            again = id(key_node) in seen
            seen.add(id(key_node))
            try:
                first = first_nodes.setdefault(key, key_node)
            except TypeError:  # an unhashable key: PyYAML's own error names it
                continue
            if first is not key_node or again:
                raise _DuplicateKey(f"duplicate key {short(key)} on line {key_node.start_mark.line + 1}, first on "
                                    f"line {first.start_mark.line + 1}; YAML 1.2 forbids duplicate keys: merge them "
                                    "into one")
        return super().construct_mapping(node, deep)


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int | _LongInteger:
    text = loader.construct_scalar(node)
    sign, digits = "-" if text.startswith("-") else "", text.lstrip("+-").lstrip("0") or "0"
    return _LongInteger(sign, digits) if len(digits) > MAX_INT_DIGITS else int(sign + digits)


_Loader.yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers if tag.endswith(":null")]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, _pattern, _first in [
        ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"), ("int", r"[-+]?[0-9]+", "-+0123456789"),
        ("float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
         "-+0123456789.")]:
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), list(_first))
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _too_long(value: Any) -> bool:
    return isinstance(value, _LongInteger) or (isinstance(value, int) and not isinstance(value, bool)
                                               and abs(value) >= 10 ** MAX_INT_DIGITS)


def check_tree(tree: Any, where: str) -> None:
    """Refuse a tree of more than ``MAX_NODES`` values or ``MAX_DEPTH`` levels, or with a too long integer.

    A value shared by aliases (or, in a Python dict, by reference) counts each time it appears,
    and the walk stops at the bound, so its time is bounded whatever the tree expands to.

    Args:
        tree: parsed YAML or a config dict.
        where: what the tree is, for the message (``"config c.yaml"``).

    Raises:
        ValueError: one line naming ``where``, and the dotted key of a too long integer.
    """
    stack: list[tuple[Any, tuple[Any, ...]]] = [(tree, ())]
    count = 0
    while stack:
        node, path = stack.pop()
        count += 1
        if count > MAX_NODES or len(path) > MAX_DEPTH:
            raise ValueError(f"{where}: more than {MAX_NODES} values or {MAX_DEPTH} levels (nested YAML aliases?)")
        if _too_long(node):
            key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")
            raise ValueError(f"{where}: {key + ': ' if key else ''}expected an integer of at most {MAX_INT_DIGITS} "
                             f"digits, got {short(node)}")
        if isinstance(node, Mapping):
            for key, child in node.items():
                if _too_long(key):
                    raise ValueError(f"{where}: expected keys of at most {MAX_INT_DIGITS} digits, got {short(key)}")
                stack.append((child, path + (key,)))
        elif isinstance(node, (list, tuple)):
            stack.extend((child, path + (index,)) for index, child in enumerate(node))


def parse_yaml(text: str, where: str = "YAML text") -> Any:
    """Parse YAML 1.2 text with the config loader.

    Args:
        text: the YAML.
        where: what the text is, for messages (``"config c.yaml"``).

    Raises:
        ValueError: invalid YAML (a duplicate key included, with its line), more than
            ``MAX_NODES`` values or ``MAX_DEPTH`` levels, or an integer of more than
            ``MAX_INT_DIGITS`` digits.
    """
    try:
        tree = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ValueError(f"{where} is not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    check_tree(tree, where)
    return tree


def parse_override_value(text: str) -> Any:
    """Parse the value of ``--set key=value`` (or an ablation grid value) as YAML 1.2.

    Raises:
        ValueError: the text is not valid YAML.

    Example:
        >>> parse_override_value("1e-1"), parse_override_value("off"), parse_override_value("")
        (0.1, 'off', None)
    """
    return parse_yaml(text, where=f"value {short(text)}")
