"""Config errors as one line: the dotted key, the value and what was expected.

pydantic reports every failed union arm and location on lines of their own; a user needs one
line that names the key, the value they gave and what it should be, with a "did you mean"
for a mistyped key. ``detfocal.modeling.validate`` uses the same functions for the head's
parameters, so its messages read like the config's own.
"""
from __future__ import annotations

import difflib
import reprlib
import types
import typing
from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

__all__ = ["ConfigError", "one_line", "short", "validate"]


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the dotted key, the value and what is expected."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
# Python refuses to print an int of more than 4300 digits (and takes quadratic time below that).
_MAX_PRINTED_INT = 10 ** 40


def short(value: Any) -> str:
    """A repr of at most 80 characters, in bounded time whatever the size of ``value``.

    Example:
        >>> short("x" * 1000)[:20], short(10 ** 5000)
        ("'xxxxxxxxxxxxxxxxxxx", 'an integer of about 5000 digits')
    """
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _MAX_PRINTED_INT:
        return f"an integer of about {round(value.bit_length() * 0.30103)} digits"  # log10(2)
    text = _REPR.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


_EXPECTED = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str",
             "finite_number": "a finite float", "dict_type": "a mapping", "model_type": "a section (mapping)",
             "tuple_type": "a list", "literal_error": "{expected}", "string_pattern_mismatch": "a module name",
             "missing": "a value (required)", "too_long": "at most {max_length} items",
             "too_short": "at least {min_length} items"}
_BOUNDS = {"greater_than": ("> ", "gt"), "greater_than_equal": (">= ", "ge"), "less_than": ("< ", "lt"),
           "less_than_equal": ("<= ", "le")}


def _expected(error: Mapping[str, Any]) -> str:
    kind, context = error["type"], error.get("ctx") or {}
    if kind == "value_error":  # an AfterValidator's or a field validator's own words
        return str(context["error"])
    if kind in _BOUNDS:
        word, name = _BOUNDS[kind]
        return word + _number(context[name])
    if kind in _EXPECTED:
        return _EXPECTED[kind].format(**context)
    return error["msg"].removeprefix("Input should be ")


def _section_of(annotation: Any) -> type[BaseModel]:
    """The section model in a field's annotation, e.g. ``EmaConfig`` in ``EmaConfig | None``."""
    arms = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    return next(arm for arm in arms or (annotation,) if isinstance(arm, type) and issubclass(arm, BaseModel))


def one_line(exc: ValidationError, data: Any, schema: type[BaseModel], prefix: str = "", where: str = "") -> str:
    """pydantic's first error as one line; a union's errors at the same key are joined with "or".

    Args:
        exc: what ``schema.model_validate(data)`` raised.
        data: what was validated, to name the keys the user wrote (not pydantic's union arms).
        schema: the model validated against, to list the allowed keys of a section.
        prefix: the dotted key of ``data`` in the whole config, e.g. ``"model.head"``.
        where: words after an unknown key, e.g. ``" for head type 'focal'"``.

    Returns:
        ``"<key>: expected <what>, got <value> (<type>)"``, or ``"unknown key <key> (did you
        mean ...?); allowed keys in <section>: ..."``, or a nested check's own message.
    """
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
            schema = _section_of(schema.model_fields[part].annotation)
        parent, allowed = key.rpartition(".")[0], list(schema.model_fields)
        close = difflib.get_close_matches(str(deepest[-1]), allowed, n=1)
        hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
        return f"unknown key {key}{where}{hint}; allowed keys in {parent or 'config'}: {', '.join(allowed)}"
    expected = " or ".join(dict.fromkeys(_expected(error) for error in errors))
    value = errors[0]["input"]
    return f"{key}: expected {expected}, got {short(value)} ({type(value).__name__})"


def validate(schema: type[BaseModel], data: Any, prefix: str = "", where: str = "", **context: Any) -> Any:
    """``schema.model_validate(data)``, with pydantic's errors as one ``ConfigError`` line.

    Args:
        schema: the section model.
        data: plain data.
        prefix: the dotted key of ``data`` in the whole config, for the message.
        where: words after an unknown key in the message.
        **context: pydantic's validation context.

    Raises:
        ConfigError: the first error, as :func:`one_line` words it.
    """
    try:
        return schema.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(one_line(exc, data, schema, prefix, where)) from None
