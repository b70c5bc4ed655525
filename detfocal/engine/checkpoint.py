"""Checkpoints as plain data: atomic writes, ``weights_only`` reads, and the RNG states in them.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only (the config is
stored with ``config_to_dict``), so ``torch.load(path, weights_only=True)`` reads it and no
pickled class can break an old file or run code on load (DETR's pickled argparse namespace
is the counter-example).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from detfocal.io import atomic_write


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`detfocal.io.atomic_write`).

    A crash or Ctrl-C mid-write leaves the previous checkpoint intact, never a truncated one.

    Args:
        path: destination, e.g. ``OUT/last.pth``; the folder is created if needed.
        state: plain data (see the module docstring).

    Returns:
        The path written.

    Example:
        >>> save_checkpoint("runs/x/last.pth", {"model": model.state_dict(), "epoch": 1})
    """
    return atomic_write(path, lambda handle: torch.save(dict(state), handle))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable checkpoint dict (truncated, or holds pickled
            objects that ``weights_only`` refuses).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... by cause
        raise ValueError(f"checkpoint {path} cannot be read with weights_only=True: "
                         f"{' '.join(str(exc).split())[:300]}") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def capture_rng_state() -> dict[str, Any]:
    """The torch, CUDA, Python and NumPy RNG states as plain data (NumPy's as a tensor + ints)."""
    version, python_state, gauss_next = random.getstate()
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``capture_rng_state`` returned (CUDA states only where CUDA is present)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
