"""Checkpoints as plain data: atomic writes, ``weights_only`` reads, and the RNG states in them.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only (the config is
stored with ``config_to_dict``), so ``torch.load(path, weights_only=True)`` reads it and no
pickled class can break an old file or run code on load (DETR's pickled argparse namespace
is the counter-example).
"""
from __future__ import annotations

import errno
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from detfocal.utils.io import atomic_write


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`detfocal.utils.io.atomic_write`).

    A crash or Ctrl-C mid-write leaves the previous checkpoint intact, never a truncated one.

    Args:
        path: destination, e.g. ``OUT/last.pth``; the folder is created if needed.
        state: plain data (see the module docstring).

    Returns:
        The path written.

    Example:
        >>> save_checkpoint("runs/x/last.pth", {"model": model.state_dict(), "epoch": 1})
    """
    def write(handle: Any) -> None:
        try:
            torch.save(dict(state), handle)
        except RuntimeError as exc:
            # torch's stream writer reports a failed write (disk full, ulimit -f) as a RuntimeError,
            # sometimes with the OSError only as its context.
            cause = exc.__context__ if isinstance(exc.__context__, OSError) else None
            if cause is None and "write" not in str(exc).lower():
                raise
            if cause is not None:
                raise OSError(cause.errno, cause.strerror or str(cause)) from None
            raise OSError(errno.EIO, " ".join(str(exc).split())[:200]) from None

    return atomic_write(path, write)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable checkpoint dict (truncated, or holds pickled
            objects that ``weights_only`` refuses).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder, expected a .pth file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes), expected a .pth file written by torch.save")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... by cause
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if "Weights only load failed" in reason:  # torch's advice to load with weights_only=False is not ours
            reason = "it holds objects other than tensors and plain values, which are never unpickled here"
        raise ValueError(f"checkpoint {path} cannot be read with weights_only=True: {reason[:300]}") from None
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


# ----------------------------------------------------------------------------------------------
# What a checkpoint holds, checked before a model is built from it.

MODEL_KEYS = ("model", "config", "num_classes", "label_to_category_id", "category_names")
RESUME_KEYS = MODEL_KEYS + ("optimizer", "rng", "best_ap")


def describe_model(config: Mapping[str, Any], num_classes: int) -> str:
    """One line naming what decides the weights' shapes, e.g. ``80 classes, resnet18, FPN 256, ...``."""
    model = config.get("model", {})
    head = model.get("head", {})
    sizes = model.get("anchor_sizes")
    scales = 3 if sizes is None else (len(sizes[0]) if isinstance(sizes[0], (list, tuple)) else 1)
    anchors = scales * len(model.get("aspect_ratios", (0.5, 1.0, 2.0)))
    return (f"{num_classes} classes, {model.get('backbone')}, FPN {model.get('fpn_channels')}, "
            f"{head.get('type')} head with {head.get('num_convs', 4)} convs (norm {head.get('norm', 'none')}), "
            f"{anchors} anchors per location")


def check_compatible(checkpoint: Mapping[str, Any], config: Any, num_classes: int, *, source: str,
                     resuming: bool = True) -> None:
    """Refuse, in one line, a checkpoint that is not a detfocal run's or holds another model.

    Args:
        checkpoint: what :func:`load_checkpoint` returned.
        config: the config the model will be built from (a ``Config``).
        num_classes: the number of classes the model will have.
        source: the checkpoint's path, for the message.
        resuming: also require the optimizer and RNG state.

    Raises:
        ValueError: keys are missing, or the model's description differs (classes, backbone,
            FPN width, head type, depth or norm, anchors per location).
    """
    from detfocal.config import config_to_dict

    required = RESUME_KEYS if resuming else MODEL_KEYS
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint {source} is not a detfocal training checkpoint: it has no {missing} "
                         f"(it holds {sorted(checkpoint)[:8]})")
    before = describe_model(checkpoint["config"], int(checkpoint["num_classes"]))
    now = describe_model(config_to_dict(config), num_classes)
    if before != now:
        raise ValueError(f"checkpoint {source} holds another model; checkpoint: {before}; config: {now}")


def _compare(own: Mapping[str, Any], state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], list[str], list[str]]:
    """``(tensors that fit, keys of another shape, keys missing from state, keys only in state)``."""
    fits = {key: value for key, value in state.items()
            if key in own and torch.is_tensor(value) and tuple(value.shape) == tuple(own[key].shape)}
    reshaped = sorted(key for key in state if key in own and key not in fits)
    missing = sorted(key for key in own if key not in state)
    unexpected = sorted(key for key in state if key not in own)
    return fits, reshaped, missing, unexpected


def _listed(keys: list[str], most: int = 4) -> str:
    return ", ".join(keys[:most]) + (f" (+{len(keys) - most} more)" if len(keys) > most else "")


def load_weights(model: nn.Module, state_dict: Mapping[str, Any], *, source: str) -> None:
    """``model.load_state_dict(state_dict)`` with a one-line error instead of the size-mismatch wall.

    Raises:
        ValueError: missing, unexpected or differently shaped keys (the first few are named).
    """
    own = model.state_dict()
    _, reshaped, missing, unexpected = _compare(own, state_dict)
    shapes = [f"{key} {tuple(state_dict[key].shape)} vs {tuple(own[key].shape)}" for key in reshaped]
    problems = [f"{label}: {_listed(items, 3)}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("shape differs (checkpoint vs model)", shapes))
                if items]
    if problems:
        raise ValueError(f"checkpoint {source} does not fit the model; " + "; ".join(problems))
    model.load_state_dict(state_dict)


def load_detector_weights(model: nn.Module, path: str | Path) -> str:
    """Start from a whole trained detector (fine-tuning): load what fits, say what does not.

    ``path`` holds a torchvision RetinaNet state dict (e.g. ``retinanet_resnet50_fpn``'s), a
    detfocal checkpoint or best.pth (its EMA weights when it has them). Tensors whose shape
    differs (the classification layer when the class count differs) keep the model's fresh
    initialisation, the prior-probability bias included.

    Returns:
        One line for the log: what was loaded, re-initialised and left out.

    Raises:
        FileNotFoundError, ValueError: the file is missing or not a state dict, or nothing fits.
    """
    state = load_checkpoint(path)
    if isinstance(state.get("model"), Mapping):
        state = state.get("ema") or state["model"]
    own = model.state_dict()
    fits, reinitialised, missing, unexpected = _compare(own, state)
    # FrozenBatchNorm2d (torchvision's pretrained backbones) has no num_batches_tracked: not a loss.
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if not fits:
        raise ValueError(f"model.weights: no tensor of {path} fits the model (it holds {sorted(state)[:4]} ...)")
    model.load_state_dict(fits, strict=False)
    line = f"model.weights: loaded {len(fits)} of {len(own)} tensors from {path}"
    if reinitialised:
        line += f"; re-initialised (other shape, e.g. another class count): {_listed(reinitialised)}"
    if missing:
        line += f"; not in the file: {_listed(missing)}"
    if unexpected:
        line += f"; in the file but not the model: {_listed(unexpected)}"
    return line
