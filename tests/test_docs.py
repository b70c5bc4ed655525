"""The README and the documentation site say what the code does: their examples run.

- Every ```python block of README.md and docs/**/*.md runs, in page order, one namespace per
  page, in a fresh temporary directory holding ``configs`` (a link to the shipped configs), so
  the examples' relative paths read as they do in a checkout.
- Every ``detfocal ...`` command in a ```bash block parses with the command's own parser, and a
  ``detfocal train`` of a config that exists loads with its ``--set`` overrides.
- The generated references (docs/gen_reference.py) cover every config key and every command.

A Python block is skipped only for a reason the block states in its first line,
``# docs-test: skip (REASON)``, or with doctest's skip directive; the reasons we accept are
that it needs a trained model (a real run's checkpoint: minutes of training) or the network
(downloaded weights). Everything else must run on a CPU in seconds, so examples stay tiny.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SKIP = re.compile(r"#\s*(?:docs-test:\s*skip|doctest:\s*\+?skip)\b(.*)", re.IGNORECASE)


def _blocks(page: Path, language: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of each fenced block of ``language`` in ``page``."""
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, match.start()) + 2, match.group(2)) for match in FENCE.finditer(text)
            if match.group(1) == language]


def _page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# Python examples

PYTHON_PAGES = [page for page in PAGES if _blocks(page, "python")]


def _python_param(page: Path):
    # A page that trains (detfocal.train) takes seconds, not milliseconds: the slow tier.
    slow = any("detfocal.train(" in code and not SKIP.search(code) for _, code in _blocks(page, "python"))
    return pytest.param(page, id=_page_id(page), marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("page", [_python_param(page) for page in PYTHON_PAGES])
def test_python_examples_run(page, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    namespace: dict = {"__name__": "__docs__"}
    skipped = []
    for line, code in _blocks(page, "python"):
        marker = SKIP.search(code)
        if marker:
            skipped.append(f"line {line}{marker.group(1).strip() and ': ' + marker.group(1).strip()}")
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                exec(compile(code, f"{_page_id(page)}:{line}", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{_page_id(page)}, the python block at line {line} failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
    if skipped and len(skipped) == len(_blocks(page, "python")):
        pytest.skip("every block is marked: " + "; ".join(skipped))


def test_skipped_python_examples_say_why():
    unexplained = [f"{_page_id(page)}:{line}" for page in PYTHON_PAGES for line, code in _blocks(page, "python")
                   if (marker := SKIP.search(code)) and len(marker.group(1).strip(" ()")) < 10]
    assert not unexplained, f"skipped examples without a reason: {unexplained}"


# ----------------------------------------------------------------------------------------------
# Shell commands

TOOL_COMMAND = re.compile(r"""main\(\[\s*["']([\w-]+)["']""")


def _tool_commands() -> dict[str, str]:
    """``tools/train.py`` -> ``train``, read from each tool's call of ``detfocal.cli.main``."""
    found = {}
    for tool in (ROOT / "tools").glob("*.py"):
        match = TOOL_COMMAND.search(tool.read_text(encoding="utf-8"))
        if match:
            found[f"tools/{tool.name}"] = match.group(1)
    return found


def _detfocal_argv(words: list[str], tools: dict[str, str]) -> list[str] | None:
    """The arguments after ``detfocal`` in one simple command, or None if it does not run detfocal."""
    for index, word in enumerate(words):
        if word == "detfocal" and (index == 0 or words[index - 1] == "-m"):
            return words[index + 1:]
        if word in tools:
            return [tools[word], *words[index + 1:]]
    return None


def _commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block: one per line (after joining ``\\`` continuations),
    split at ``&&``, ``||``, ``;`` and ``|``, without comments."""
    commands = []
    for text in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [command for command in commands if command]


SHELL_VARIABLE = re.compile(r"^\$(\w+|\{\w+\})$")


def _without_bare_variables(argv: list[str]) -> list[str]:
    """Drop a ``$VAR`` that is not an option's value: it may expand to options or to nothing."""
    return [word for index, word in enumerate(argv)
            if not (SHELL_VARIABLE.match(word) and (index == 0 or not argv[index - 1].startswith("-")))]


def _shell_commands() -> list[tuple[str, list[str]]]:
    tools = _tool_commands()
    found = []
    for page in PAGES:
        for line, code in _blocks(page, "bash"):
            for command in _commands(code):
                argv = _detfocal_argv(command, tools)
                if argv is not None:
                    argv = _without_bare_variables(argv)
                    found.append((f"{_page_id(page)}:{line} detfocal {' '.join(argv)}", argv))
    return found


SHELL_COMMANDS = _shell_commands()


def _parser_for(argv: list[str]) -> tuple[argparse.ArgumentParser | None, list[str]]:
    from detfocal.cli import FORWARDED, build_parser

    if argv and argv[0] in FORWARDED:
        try:
            found = _load_generator()._forwarded_parser(FORWARDED[argv[0]][0])
        except ImportError:  # griffe (the docs extra) is not installed
            return None, argv
        return (found if isinstance(found, argparse.ArgumentParser) else None), argv[1:]
    return build_parser(), argv


def test_the_pages_show_detfocal_commands():
    assert len(SHELL_COMMANDS) >= 20, [name for name, _ in SHELL_COMMANDS]


@pytest.mark.parametrize("argv", [pytest.param(argv, id=name) for name, argv in SHELL_COMMANDS])
def test_shell_commands_parse(argv, monkeypatch):
    monkeypatch.chdir(ROOT)
    parser, rest = _parser_for(argv)
    if parser is None:
        pytest.skip(f"detfocal {argv[0]} has no build_parser to check its arguments against")
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            args = parser.parse_args(rest)
        except SystemExit:
            raise AssertionError(f"detfocal {' '.join(argv)}: {errors.getvalue().strip()}") from None
    if argv[0] == "train" and Path(args.config).is_file():
        from detfocal.config import load_config

        load_config(args.config, args.set)  # the overrides name real keys with valid values


# ----------------------------------------------------------------------------------------------
# The generated references and the shipped configs


def test_config_reference_lists_every_key():
    pytest.importorskip("griffe")
    generator = _load_generator()
    page = generator.config_reference()
    sections = {block.split("\n", 1)[0].strip("` "): block for block in page.split("\n## ")[1:]}
    missing = [f"{title}: {key}" for title, keys in generator.config_sections().items() for key in keys
               if f"| `{key}` |" not in sections.get(title, "")]
    assert not missing, f"keys missing from the configuration reference: {missing}"
    from detfocal.utils.registry import HEADS

    assert all(f"`type: {name}`" in page for name in HEADS.names())


def test_cli_reference_lists_every_command_and_option():
    pytest.importorskip("griffe")
    from detfocal.cli import build_parser

    page = _load_generator().cli_reference()
    parser = build_parser()
    commands = next(action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    for name, sub in commands.items():
        assert f"## `detfocal {name}`" in page
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}" in page, f"detfocal {name} {option} is missing from the CLI reference"


def test_shipped_configs_resolve_by_name_and_an_existing_file_wins(tmp_path, monkeypatch):
    from detfocal.configs import CONFIG_DIR, resolve_config_path, shipped_configs

    assert "shapes_retinanet_r18" in shipped_configs()
    assert resolve_config_path("shapes_retinanet_r18") == CONFIG_DIR / "shapes_retinanet_r18.yaml"
    assert resolve_config_path("ablations/shapes_gamma0.yaml") == CONFIG_DIR / "ablations" / "shapes_gamma0.yaml"
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "shapes_retinanet_r18.yaml"
    own.write_text("model: {}\n")
    assert resolve_config_path("shapes_retinanet_r18.yaml") == Path("shapes_retinanet_r18.yaml")
    with pytest.raises(FileNotFoundError, match="shipped: .*shapes_retinanet_r18"):
        resolve_config_path("no_such_config")


def test_every_shipped_config_is_packaged():
    """setup.cfg's package_data globs cover every YAML file in detfocal/configs (a new folder needs a glob)."""
    import configparser

    from detfocal.configs import CONFIG_DIR

    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    globs = [item.strip() for item in setup["options.package_data"]["detfocal.configs"].split(",")]
    files = [path.relative_to(CONFIG_DIR).as_posix() for path in CONFIG_DIR.rglob("*.y*ml")]
    assert files
    unpackaged = [name for name in files if not any(fnmatch.fnmatch(name, glob) and name.count("/") == glob.count("/")
                                                    for glob in globs)]
    assert not unpackaged, f"not in setup.cfg [options.package_data] detfocal.configs: {unpackaged}"
    assert (ROOT / "configs").resolve() == CONFIG_DIR, "configs/ must stay a link to detfocal/configs"
