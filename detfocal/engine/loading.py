"""Loading a trained detector: :func:`load_model` (used by eval, infer, export and the benchmark).

A checkpoint is data from a file the user may have been handed, so everything the model is
built from is checked before anything is allocated: the stored fields' types and bounds, then
the stored weights' shapes against the model built on PyTorch's ``meta`` device (which
allocates nothing). A crafted ``num_classes`` or ``fpn_channels`` is refused in one line
instead of allocating gigabytes first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

__all__ = ["check_checkpoint_fields", "load_model"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_weights(name: str, weights: Any, source: str) -> None:
    if not isinstance(weights, Mapping):
        raise ValueError(f"checkpoint {source}: '{name}' holds a {type(weights).__name__}, expected a state dict "
                         f"(parameter name -> tensor)")
    bad = [str(key) for key, value in weights.items() if not isinstance(key, str) or not torch.is_tensor(value)]
    if bad:
        raise ValueError(f"checkpoint {source}: '{name}' is not a state dict: {len(bad)} entries are not "
                         f"name -> tensor, e.g. {bad[:3]}")


def check_checkpoint_fields(state: Mapping[str, Any], source: str) -> None:
    """Check the fields a model is built from, before anything is built or allocated.

    Args:
        state: a loaded checkpoint.
        source: its path, for the messages.

    Raises:
        ValueError: a field is missing, of the wrong type or out of bounds (``num_classes`` in
            [1, MAX_CLASSES], the config's bound; one category id and name per class), on one
            line naming the field, its value and what was expected.
    """
    from detfocal.config.schema import MAX_CLASSES
    from detfocal.engine.checkpoint import MODEL_KEYS

    missing = [key for key in MODEL_KEYS if key not in state]
    if missing:
        raise ValueError(f"checkpoint {source} is not a detfocal training checkpoint: it has no {missing} "
                         f"(it holds {sorted(map(str, state))[:8]})")
    if not isinstance(state["config"], Mapping):
        raise ValueError(f"checkpoint {source}: 'config' holds a {type(state['config']).__name__}, expected a dict")
    _check_weights("model", state["model"], source)
    if state.get("ema") is not None:
        _check_weights("ema", state["ema"], source)
    num_classes = state["num_classes"]
    if not _is_int(num_classes) or not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"checkpoint {source}: num_classes: expected an int in [1, {MAX_CLASSES}], "
                         f"got {num_classes!r:.60}")
    ids, names = state["label_to_category_id"], state["category_names"]
    if not isinstance(ids, (list, tuple)) or len(ids) != num_classes or not all(map(_is_int, ids)) \
            or len(set(ids)) != len(ids):
        raise ValueError(f"checkpoint {source}: label_to_category_id: expected {num_classes} distinct int ids "
                         f"(num_classes), got {str(ids)[:100]}")
    if not isinstance(names, (list, tuple)) or len(names) != num_classes or \
            not all(isinstance(name, str) for name in names):
        raise ValueError(f"checkpoint {source}: category_names: expected {num_classes} names (num_classes), "
                         f"got {str(names)[:100]}")
    for key in ("iteration", "global_step", "epoch"):
        if state.get(key) is not None and not _is_int(state[key]):
            raise ValueError(f"checkpoint {source}: {key}: expected an int, got {state[key]!r:.60}")


def load_model(checkpoint: str | Path | Mapping[str, Any], config: str | Path | None = None, *,
               overrides: Sequence[str] = (), device: torch.device | str | None = None, source: str | None = None,
               **model_kwargs_override: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build the detector a training checkpoint holds and load its weights, in eval mode.

    The config comes from ``config`` (a YAML file the user names; its ``imports`` run) or
    else from the checkpoint, whose stored config is data only: it never imports a module or
    generates data. A type it names that is not registered raises an error saying which
    module to import. The stored fields and the weights' shapes are checked before the
    model is allocated (see the module docstring).

    Args:
        checkpoint: a path to a checkpoint written by ``detfocal train``, or its loaded dict.
        config: a YAML config to build the model from instead of the stored one.
        overrides: ``key=value`` config overrides.
        device: where the model goes; default CUDA when available, else CPU.
        source: how to name a checkpoint given as a dict in messages (default: its path).
        **model_kwargs_override: builder arguments to replace, e.g. ``score_thresh=0.5``.

    Returns:
        ``(model, info)``; ``info`` has ``config``, ``num_classes``, ``label_to_category_id``,
        ``category_names``, ``iteration`` and ``epoch``.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: it is a folder, unreadable, not a detfocal checkpoint, holds fields of
            the wrong type or out of bounds, or does not fit the model.

    Example:
        >>> model, info = load_model("runs/shapes_retinanet_r18/best.pth")
        >>> detections = model([image])[0]
    """
    from detfocal.config import config_from_dict, config_to_dict, load_config, model_kwargs
    from detfocal.engine.checkpoint import check_compatible, load_checkpoint, load_weights
    from detfocal.modeling.validate import check_model_config
    from detfocal.utils.registry import DETECTORS

    source = source or ("<dict>" if isinstance(checkpoint, Mapping) else str(checkpoint))
    state = checkpoint if isinstance(checkpoint, Mapping) else load_checkpoint(checkpoint)
    check_checkpoint_fields(state, source)
    cfg = load_config(config, overrides) if config is not None else config_from_dict(state["config"], overrides)
    check_model_config(config_to_dict(cfg)["model"], imports=cfg.imports)  # registered types, head arguments
    num_classes = state["num_classes"]
    check_compatible(state, cfg, num_classes, source=source, resuming=False)
    kwargs = model_kwargs(cfg, num_classes) | {"weights_backbone": None} | model_kwargs_override
    build = DETECTORS.get(cfg.model.type)  # weights come from the checkpoint: no download
    weights = state.get("ema") or state["model"]  # the EMA weights when trained with one
    with torch.device("meta"):  # shapes only, nothing allocated
        skeleton = build(**kwargs)
    own = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    if own != {key: tuple(value.shape) for key, value in weights.items()}:
        load_weights(skeleton, weights, source=source)  # raises, naming the keys that differ
    model = build(**kwargs)
    load_weights(model, weights, source=source)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    info = {"config": cfg, "num_classes": num_classes,
            "label_to_category_id": list(state["label_to_category_id"]),
            "category_names": list(state["category_names"]),
            "iteration": state.get("iteration", state.get("global_step")), "epoch": state.get("epoch")}
    return model.to(device).eval(), info
