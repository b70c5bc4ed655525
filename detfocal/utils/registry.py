"""A tiny name -> class registry, so configs can say ``type: focal``.

mmdetection's idea without its machinery: a dict, a decorator that refuses
duplicates, a ``get`` whose error lists what exists, and ``build``.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence, TypeVar

T = TypeVar("T")


class Registry:
    """Maps names to classes or factory functions.

    Example:
        >>> MODELS = Registry("models")
        >>> @MODELS.register("identity")
        ... def identity(x=1):
        ...     return x
        >>> MODELS.build({"type": "identity", "x": 3})
        3
    """

    def __init__(self, name: str, builtin_modules: Sequence[str] = ()) -> None:
        self.name = name
        self._entries: dict[str, Callable[..., Any]] = {}
        # Imported on the first lookup, so ``import detfocal`` stays cheap and the built-ins
        # are still always there when a config names them.
        self._builtin_modules = tuple(builtin_modules)

    def _load_builtins(self) -> None:
        modules, self._builtin_modules = self._builtin_modules, ()
        for module in modules:
            importlib.import_module(module)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a duplicate name raises ``ValueError``."""

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.name}: name {name!r} is already registered to {self._entries[name]!r}")
            self._entries[name] = obj  # type: ignore[assignment]
            return obj

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        """Return what is registered as ``name``; an unknown name raises ``KeyError`` listing the known ones."""
        self._load_builtins()
        if name not in self._entries:
            raise KeyError(f"{self.name}: unknown type {name!r}; registered: {sorted(self._entries)}")
        return self._entries[name]

    def build(self, cfg: Mapping[str, Any], **extra: Any) -> Any:
        """Call the entry named by ``cfg["type"]`` with the other keys (and ``extra``) as keyword arguments."""
        if "type" not in cfg:
            raise KeyError(f"{self.name}: config {dict(cfg)!r} has no 'type'; registered: {sorted(self._entries)}")
        kwargs = {k: v for k, v in cfg.items() if k != "type"}
        return self.get(cfg["type"])(**kwargs, **extra)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)


HEADS = Registry("HEADS", ["detfocal.modeling.heads", "detfocal.modeling.quality_heads"])
BACKBONES = Registry("BACKBONES", ["detfocal.modeling.backbones"])
DETECTORS = Registry("DETECTORS", ["detfocal.modeling.retinanet"])
