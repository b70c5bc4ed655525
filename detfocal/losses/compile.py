"""Choosing between the eager loss and its ``torch.compile``-d twin.

Inductor turns the analytic loss-plus-gradient into one vectorised C++ loop on CPU and a
Triton kernel on CUDA. The first call pays for the compile, so ``DETFOCAL_COMPILE=auto``
(the default) compiles only for inputs of at least :data:`AUTO_MIN_NUMEL` logits; ``1``
always compiles, ``0`` never does. A failed compile (no C++ compiler, no Triton, an
unsupported platform) falls back to eager once, with a warning, and stays there. A call
that autograd records (a backward with ``create_graph=True`` recomputing the loss) runs
eager: compiled graphs do not support double backward.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import time
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Compile only inputs the size of a detector batch, where the fused kernel pays for its
# compile; unit tests and small batches stay eager.
AUTO_MIN_NUMEL = 1 << 22

_compiled: dict[Callable[..., Any], Callable[..., Any]] = {}
_state: dict[str, Any] = {"failed": None, "compile_seconds": {}, "last": "eager"}


def compile_mode() -> str:
    """The ``DETFOCAL_COMPILE`` setting: "0", "1" or "auto"."""
    mode = os.environ.get("DETFOCAL_COMPILE", "auto").strip().lower()
    aliases = {"": "auto", "false": "0", "off": "0", "no": "0", "true": "1", "on": "1", "yes": "1"}
    mode = aliases.get(mode, mode)
    if mode not in ("0", "1", "auto"):
        raise ValueError(f"DETFOCAL_COMPILE must be 0, 1 or auto, got {os.environ['DETFOCAL_COMPILE']!r}")
    return mode


@functools.lru_cache(maxsize=None)
def compile_supported(device_type: str) -> bool:
    """Whether Inductor can plausibly build kernels for ``device_type`` here."""
    if not hasattr(torch, "compile"):
        return False
    if device_type == "cpu":
        return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def _wants_compile(logits: Tensor) -> bool:
    if _state["failed"] is not None:
        return False
    mode = compile_mode()
    if mode == "0":
        return False
    if mode == "1":
        return True
    return logits.numel() >= AUTO_MIN_NUMEL and compile_supported(logits.device.type)


def _compiled_version(fn: Callable[..., Any]) -> Callable[..., Any]:
    if fn not in _compiled:
        # dynamic=True: N changes every batch (image sizes vary), so compile symbolic shapes
        # once instead of once per N.
        compiled = torch.compile(fn, dynamic=True, fullgraph=True)

        @functools.wraps(fn)
        def run(*args: Any) -> Any:
            if torch.is_grad_enabled() and any(isinstance(arg, Tensor) and arg.requires_grad for arg in args):
                return fn(*args)  # autograd through the loss itself (create_graph): eager
            first = fn.__name__ not in _state["compile_seconds"]
            start = time.perf_counter()
            try:
                out = compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure means "use eager"
                _state["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                warnings.warn(f"detfocal: torch.compile of the focal loss failed ({_state['failed']}); "
                              "falling back to the eager implementation", RuntimeWarning, stacklevel=3)
                return fn(*args)
            if first:
                seconds = time.perf_counter() - start
                _state["compile_seconds"][fn.__name__] = seconds
                logger.info("detfocal: compiled %s in %.1f s (first call)", fn.__name__, seconds)
            return out

        _compiled[fn] = run
    return _compiled[fn]


def select_backend(fn: Callable[..., Any], logits: Tensor) -> Callable[..., Any]:
    """Return ``fn`` or its compiled twin for these logits, and remember which was chosen."""
    if _wants_compile(logits):
        _state["last"] = "compiled"
        return _compiled_version(fn)
    _state["last"] = "eager"
    return fn


def backend() -> dict[str, Any]:
    """What the loss runs on: the setting, the last choice, compile times and any fallback.

    Returns:
        ``{"mode": "auto"|"0"|"1", "last": "eager"|"compiled", "compile_seconds": {fn: s},
        "fallback": None or the compile error, "auto_min_numel": int}``.
    """
    return {
        "mode": compile_mode(),
        "last": _state["last"],
        "compile_seconds": dict(_state["compile_seconds"]),
        "fallback": _state["failed"],
        "auto_min_numel": AUTO_MIN_NUMEL,
    }
