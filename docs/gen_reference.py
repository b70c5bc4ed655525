"""mkdocs hook: the configuration and command-line references, generated from the code.

``reference/config.md`` comes from the pydantic schema (:class:`detfocal.config.Config` and its
nested sections, with each field's ``description``), the registered heads' signatures and
docstrings, and the shapes generator's; ``reference/cli.md`` from the argparse parsers.
Nothing here is written by hand about a key or an option, so the pages cannot drift from
the code. ``tests/test_docs.py`` imports this file to check the pages cover every key.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import os
import re
import types
import typing
from typing import Any, Callable, Iterator, Literal, Union

CONFIG_PAGE = "reference/config.md"
CLI_PAGE = "reference/cli.md"

# build_retinanet passes these to every head; a config never sets them (detfocal.config checks the rest).
HEAD_BUILD_ARGS = ("in_channels", "num_anchors", "num_classes", "norm_layer")
# Forwarded commands: (command, module); the parser comes from ``build_parser`` in the module or
# its ``command`` submodule, else from the module's ``main(["--help"])``.
FORWARDED = (("benchmark", "detfocal.benchmark"), ("ablate", "detfocal.ablate"), ("study", "detfocal.study"))
# A Sphinx role in a docstring (:func:`name`, :class:`~a.b.C`): shown as code, ~ keeping the last part.
ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj):`(~?)([^`]+)`")


# ----------------------------------------------------------------------------------------------
# Types, values and docstrings as short text


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _bounds(metadata: list[Any]) -> dict[str, Any]:
    """``{"gt"|"ge"|"lt"|"le": value, "pattern": str}`` from pydantic's (possibly nested) metadata."""
    found: dict[str, Any] = {}
    for meta in metadata:
        nested = getattr(meta, "metadata", None)
        if isinstance(nested, list):
            found.update(_bounds(nested))
            continue
        for attribute in ("gt", "ge", "lt", "le", "pattern"):
            value = getattr(meta, attribute, None)
            if value is not None and not isinstance(value, bool):
                found[attribute] = value
    return found


def _constraints(base: str, metadata: list[Any]) -> str:
    """``int in [1, 4096]``, ``float > 0``, ``float in [0, 1]``: the type with its range."""
    bounds = _bounds(metadata)
    if base == "int" and "gt" in bounds and isinstance(bounds["gt"], int):
        bounds["ge"] = bounds.pop("gt") + 1
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    text = base
    if low and high:
        text = f"{base} in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
    elif low:
        text = f"{base} {'>=' if low[0] == '[' else '>'} {_number(low[1])}"
    elif high:
        text = f"{base} {'<=' if high[0] == ']' else '<'} {_number(high[1])}"
    if isinstance(bounds.get("pattern"), str):
        text += " (a dotted module name)" if "\\." in bounds["pattern"] else f" matching `{bounds['pattern']}`"
    return text


def type_text(annotation: Any) -> str:
    """A type annotation as a reader says it: ``int > 0 or null``, ``list of float``."""
    from pydantic import BaseModel

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        base, *metadata = args
        return _constraints(type_text(base), metadata)
    if origin in (Union, types.UnionType):
        parts = [type_text(arg) for arg in args if arg is not type(None)]
        text = " or ".join(dict.fromkeys(parts))
        return f"{text} or null" if type(None) in args else text
    if origin is Literal:
        return " | ".join(f"`{value}`" for value in args)
    if origin in (tuple, list):
        if len(args) == 2 and args[1] is Ellipsis:
            item = type_text(args[0])
            return f"list of ({item})" if " or " in item else f"list of {item}"
        if args:
            return f"[{', '.join(type_text(arg) for arg in args)}]"
        return "list"
    if origin is dict or annotation is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if isinstance(annotation, typing.TypeVar):
        return "value"
    names = {int: "int", float: "float", str: "string", bool: "bool", type(None): "null", Any: "any"}
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation))


def value_text(value: Any) -> str:
    """A default as it would be written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {value_text(item)}" for key, item in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped, Sphinx roles and double backticks as plain code,
    and ``<`` ``>`` outside code escaped (``runs/<config name>`` is not an HTML tag)."""
    text = ROLE.sub(lambda match: f"`{match[2].rsplit('.', 1)[-1] if match[1] else match[2]}`", " ".join(str(text).split()))
    parts = text.replace("``", "`").split("`")
    parts[::2] = [part.replace("<", "&lt;").replace(">", "&gt;") for part in parts[::2]]
    return "`".join(parts).replace("|", "\\|")


def docstring_parameters(obj: Any) -> dict[str, str]:
    """``{name: description}`` from the Google-style ``Args:`` section of ``obj``'s docstring."""
    from griffe import Docstring, Parser

    text = inspect.getdoc(obj) or ""
    parsed = Docstring(text, lineno=1).parse(Parser.google, warn_missing_types=False, warn_unknown_params=False)
    return {parameter.name: parameter.description for section in parsed if section.kind.value == "parameters"
            for parameter in section.value}


def first_paragraph(obj: Any) -> str:
    text = inspect.getdoc(obj) or ""
    return " ".join(text.split("\n\n", 1)[0].split())


# ----------------------------------------------------------------------------------------------
# The configuration reference


def _sections(model: type, prefix: str = "") -> Iterator[tuple[str, type]]:
    """``(dotted prefix, section class)`` for ``model`` and every nested section, depth first."""
    from pydantic import BaseModel

    yield prefix, model
    for name, field in model.model_fields.items():
        candidates = typing.get_args(field.annotation) or (field.annotation,)
        nested = [arg for arg in candidates if isinstance(arg, type) and issubclass(arg, BaseModel)]
        if nested:
            yield from _sections(nested[0], f"{prefix}{name}.")


def _field_default(field: Any) -> str:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
        return "" if isinstance(value, BaseModel) else value_text(value)
    return "required" if field.default is PydanticUndefined else value_text(field.default)


def config_sections() -> dict[str, list[str]]:
    """``{section title: its keys}`` in page order; the top level's title is "Top level"."""
    from detfocal.config import Config

    return {prefix.rstrip(".") or "Top level": list(model.model_fields) for prefix, model in _sections(Config)}


def _signature_rows(function: Callable[..., Any], skip: tuple[str, ...]) -> list[str]:
    described = docstring_parameters(function)
    rows = []
    for name, parameter in inspect.signature(function).parameters.items():
        if name in skip or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = "required" if parameter.default is parameter.empty else value_text(parameter.default)
        rows.append(f"| `{name}` | {_cell(default)} | {_cell(described.get(name, ''))} |")
    return rows


def _head_section() -> list[str]:
    from detfocal.utils.registry import HEADS

    lines = ["### Heads (`model.head`)", "",
             "`model.head` is a mapping: `type` names a registered head, `norm` (`none`, `gn` or `bn`) "
             "sets the normalisation of its convs and the box subnet's, and the other keys are that head's "
             "keyword arguments, checked against its signature when the config loads. A `type` in an "
             "override or a `_base_` child replaces the whole mapping instead of merging. "
             "The built-in heads:", ""]
    for name in HEADS.names():
        factory = HEADS.get(name)
        lines += [f"#### `type: {name}`", "", f"`{factory.__module__}.{factory.__qualname__}`: "
                  f"{first_paragraph(factory)}", "", "| key | default | description |", "|---|---|---|"]
        lines += _signature_rows(factory, HEAD_BUILD_ARGS)
        lines.append("")
    return lines


def _shapes_section() -> list[str]:
    from detfocal.data import shapes

    lines = ["### The shapes dataset (`data.shapes`)", "",
             "`data.shapes` is a mapping of the arguments of `detfocal.data.shapes.generate`, plus `root`, the "
             "folder it writes to (default `data/shapes`, relative to the working directory). When it is set the "
             "dataset is generated if missing and fills the train and val paths that are not given.", "",
             "| key | default | description |", "|---|---|---|",
             "| `root` | data/shapes | the dataset's folder |"]
    lines += _signature_rows(shapes.generate, ("out_dir",))
    return lines + [""]


def config_reference() -> str:
    """The markdown of the configuration reference."""
    from detfocal.config import Config

    lines = ["# Configuration reference", "",
             "<!-- Generated by docs/gen_reference.py from detfocal.config.Config at build time: edit the "
             "Field descriptions in the code, not this page. -->", "",
             "A config is one YAML file with the sections below. Every key is optional (the default is "
             "shown); an unknown key, a wrong type or a value out of range stops the load with one line "
             "that names the dotted key. `_base_: other.yaml` inherits another file and deep-merges into "
             "it, `_delete_: true` in a mapping replaces instead of merging, and `--set key=value` on the "
             "command line overrides any key, the value parsed as YAML 1.2.", "",
             "Each table below lists the keys of one section; a key's dotted name is the section's "
             "name, a dot and the key: `lr` under `train` is `train.lr` (`--set train.lr=0.02`).", "",
             "Shipped configs can be named without a path or `.yaml`: `detfocal train shapes_retinanet_r18`. "
             "Their files, every key commented, are in `configs/` of the repository.", ""]
    for prefix, model in _sections(Config):
        title = prefix.rstrip(".") or "Top level"
        lines += [f"## `{title}`" if prefix else f"## {title}", ""]
        doc = inspect.getdoc(model) if model.__doc__ else None
        if doc and prefix:
            lines += [" ".join(doc.split()), ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            default = _field_default(field)
            kind = type_text(field.annotation)
            if field.metadata:
                kind = _constraints(kind, list(field.metadata))
            described = field.description or ""
            if kind == "section" or kind.startswith("section or"):
                described = (described + f" See [`{prefix}{name}`](#{(prefix + name).replace('.', '')}).").strip()
            lines.append(f"| `{name}` | {_cell(kind)} | {_cell(default)} | {_cell(described)} |")
        lines.append("")
        if prefix == "model.":
            lines += _head_section()
        if prefix == "data.":
            lines += _shapes_section()
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The command-line reference


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps its subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _metavar(action: argparse.Action) -> str:
    name = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    if action.choices is not None and action.metavar is None:
        name = "{" + ",".join(map(str, action.choices)) + "}"
    return {"?": f"[{name}]", "+": f"{name} ...", "*": f"[{name} ...]"}.get(action.nargs, name)


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            metavar = "" if action.nargs == 0 else " " + _metavar(action)
            name = ", ".join(f"`{option}{metavar}`" for option in action.option_strings)
        else:
            name = f"`{_metavar(action)}`"
        default = action.default
        hidden = default is None or default is False or default == [] or default == argparse.SUPPRESS
        shown = "" if hidden or action.nargs == 0 else value_text(default)
        rows.append(f"| {name} | {_cell(action.help or '')} | {_cell(shown)} |")
    return rows


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text[:1].upper() + text[1:] if text else text


@contextlib.contextmanager
def _columns(width: int = 80) -> Iterator[None]:
    """argparse wraps usage lines at ``$COLUMNS``: fix it, so the page does not depend on the terminal."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def _parser_section(title: str, parser: argparse.ArgumentParser, preformatted: bool = False) -> list[str]:
    with _columns():
        usage = parser.format_usage().strip()
    lines = [f"## `{title}`", ""]
    description = parser.description or ""
    if preformatted and "\n" in description.strip():
        lines += ["```text", description.strip("\n"), "```", ""]
    elif description:
        lines += [_sentence(description) + ("" if description.rstrip().endswith(".") else "."), ""]
    lines += ["```text", usage, "```", "", "| argument | meaning | default |", "|---|---|---|"]
    return lines + _option_rows(parser) + [""]


def _forwarded_parser(module_name: str) -> argparse.ArgumentParser | str:
    """The forwarded command's parser, or its ``--help`` text where it has no ``build_parser``."""
    module = importlib.import_module(module_name)
    for candidate in (module, f"{module_name}.command"):
        try:
            owner = importlib.import_module(candidate) if isinstance(candidate, str) else candidate
        except ImportError:
            continue
        if callable(getattr(owner, "build_parser", None)):
            return owner.build_parser()
    out = io.StringIO()
    with _columns(), contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        module.main(["--help"])
    return out.getvalue()


def cli_reference() -> str:
    """The markdown of the command-line reference."""
    from detfocal.cli import build_parser

    parser = build_parser()
    commands = _subcommands(parser)
    forwarded = dict(FORWARDED)
    lines = ["# Command-line reference", "",
             "<!-- Generated by docs/gen_reference.py from the argparse parsers at build time. -->", "",
             "Installing detfocal (`pip install .`, or the bootstrap) installs the `detfocal` command; `python -m detfocal` and "
             "`tools/*.py` in a source checkout are the same commands. `detfocal --help` answers without "
             "loading torch. A user error (a bad path, key or value) prints one line, `error: ...`, and exits "
             "with 2; a non-finite loss or gradient exits with 1; a stop signal with 128 + its number "
             "(130 for Ctrl-C). A traceback means a bug.", "",
             "```text", " ".join(parser.format_usage().split()), "```", "",
             "| command | what it does |", "|---|---|"]
    lines += [f"| [`{name}`](#detfocal-{name}) | {_cell(_sentence(sub.description or ''))} |"
              for name, sub in commands.items()]
    lines.append("")
    for name, sub in commands.items():
        if name in forwarded:
            found = _forwarded_parser(forwarded[name])
            if isinstance(found, str):
                lines += [f"## `detfocal {name}`", "", "```text", found.strip("\n"), "```", ""]
            else:
                lines += _parser_section(f"detfocal {name}", found, preformatted=True)
        else:
            lines += _parser_section(f"detfocal {name}", sub)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The mkdocs hook


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for path, text in ((CONFIG_PAGE, config_reference()), (CLI_PAGE, cli_reference())):
        files.append(File.generated(config, path, content=text))
    return files
