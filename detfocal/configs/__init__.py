"""The configs shipped with detfocal, and how a config argument finds its file.

The YAML files in this folder are installed with the package, so ``detfocal train
shapes_retinanet_r18`` works from any directory; a source checkout shows the same files at
``configs/`` (a link to this folder), which is where users read them.

Example:
    >>> from detfocal.configs import resolve_config_path
    >>> resolve_config_path("shapes_retinanet_r18").name
    'shapes_retinanet_r18.yaml'
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CONFIG_DIR", "resolve_config_path", "shipped_configs"]

CONFIG_DIR = Path(__file__).resolve().parent
_SUFFIXES = (".yaml", ".yml")


def shipped_configs() -> list[str]:
    """Names of the shipped configs, as ``resolve_config_path`` accepts them (``ablations/shapes_gamma0``)."""
    return sorted(path.relative_to(CONFIG_DIR).with_suffix("").as_posix()
                  for path in CONFIG_DIR.rglob("*") if path.suffix in _SUFFIXES and path.is_file())


def resolve_config_path(name_or_path: str | os.PathLike[str]) -> Path:
    """The config file a command-line or API argument names.

    An existing file wins, so a user's own ``shapes_retinanet_r18.yaml`` in the working
    directory is never shadowed. Otherwise a relative name, with or without ``.yaml``
    (``shapes_retinanet_r18``, ``ablations/shapes_gamma0``), names a shipped config.

    Args:
        name_or_path: a path to a YAML file, or the name of a shipped config.

    Returns:
        The path to load: ``name_or_path`` itself when it exists (a folder is refused by the
        loader, which names it), else the shipped file.

    Raises:
        FileNotFoundError: a name without ``.yaml`` names neither a file nor a shipped config;
            the message lists the shipped names.
    """
    path = Path(name_or_path)
    if path.exists():  # a file, or a folder the loader will name as one
        return path
    if not path.is_absolute() and ".." not in path.parts:
        names = [path] if path.suffix in _SUFFIXES else [path.with_name(path.name + suffix) for suffix in _SUFFIXES]
        for candidate in names:
            shipped = CONFIG_DIR / candidate
            if shipped.is_file():
                return shipped
    if path.suffix in _SUFFIXES or path.is_absolute():
        return path  # a path to a file that is not there: the loader says so
    raise FileNotFoundError(f"config file {name_or_path} does not exist, and no shipped config has that name; "
                            f"shipped: {', '.join(shipped_configs())}")
