"""The package's layers import only downward: utils -> config -> losses -> data -> modeling ->
evaluation -> engine -> the command layer (cli, benchmark, ablate, study). Function-level imports count too:
a lazy import that runs upward is still a cycle waiting to happen."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "detfocal"
LAYERS = ["utils", "config", "losses", "data", "modeling", "evaluation", "engine", "commands"]
# The command layer's modules; __init__ too, as the package root's lazy names count as commands.
COMMANDS = {"cli", "benchmark", "ablate", "study", "__main__", "__init__"}
PRIVATE = re.compile(r"\btorch\._[A-Za-z]\w*|torchvision\.models\.detection\._utils")


def _layer(module: str) -> str | None:
    """``detfocal.engine.train`` -> "engine"; ``detfocal.configs`` (the packaged YAMLs) sits with config."""
    parts = module.split(".")
    if parts[0] != "detfocal":
        return None
    top = parts[1] if len(parts) > 1 else "__init__"
    if top in COMMANDS:
        return "commands"
    return "config" if top == "configs" else top


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """Every module ``path`` imports (at any depth: function-level imports count), absolute names."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                name = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def upward_imports(path: Path, module: str) -> list[str]:
    """The imports of ``path`` (the module ``module``) that reach a higher layer than its own."""
    own = _layer(module)
    assert own in LAYERS, f"{path} is in no layer; add its folder to LAYERS"
    return sorted({f"line {line}: {name}" for line, name in _imports(path, module)
                   if (layer := _layer(name)) in LAYERS and LAYERS.index(layer) > LAYERS.index(own)})


SOURCES = sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_every_module_imports_only_its_own_layer_or_lower_ones(path):
    upward = upward_imports(path, _name(path))
    assert not upward, f"{path.relative_to(PACKAGE)} ({_layer(_name(path))}) imports upward: {upward}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_private_torch_and_torchvision_names_appear_only_in_utils_compat(path):
    if path == PACKAGE / "utils" / "_compat.py":
        return
    found = PRIVATE.findall(path.read_text(encoding="utf-8"))
    assert not found, f"{path.relative_to(PACKAGE)} uses {sorted(set(found))}; go through detfocal.utils._compat"


def test_the_layer_check_catches_a_lazy_upward_import(tmp_path):
    module = tmp_path / "coco.py"
    module.write_text("import torch\nfrom ..utils import io\n\ndef f():\n    from detfocal.engine.train import train\n")
    assert upward_imports(module, "detfocal.data.coco") == ["line 5: detfocal.engine.train",
                                                            "line 5: detfocal.engine.train.train"]
    assert PRIVATE.findall("x = torch._foreach_add(a, b); from torchvision.models.detection._utils import Matcher")
