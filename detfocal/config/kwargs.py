"""Config -> plain keyword arguments and paths. Classes and builders never see a ``Config``.

Nothing here touches the disk: ``data_paths`` only computes where the data is, and the data
stage generates the shapes set with ``detfocal.data.shapes.ensure_dataset(**shapes_kwargs(cfg))``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from detfocal.config.loading import config_to_dict
from detfocal.config.schema import DEFAULT_SHAPES_ROOT, Config, DataConfig

__all__ = ["data_paths", "dataset_kwargs", "model_kwargs", "optimizer_kwargs", "scheduler_kwargs", "shapes_kwargs",
           "transform_kwargs"]

_SPLITS = ("train", "val")


def shapes_kwargs(cfg: Config) -> dict[str, Any] | None:
    """Keyword arguments of ``detfocal.data.shapes.ensure_dataset``: ``root`` and the ``data.shapes`` keys given.

    Returns:
        None when the config has no ``data.shapes`` section.
    """
    shapes = cfg.data.shapes
    return None if shapes is None else {"root": DEFAULT_SHAPES_ROOT, **shapes}


def data_paths(data: DataConfig) -> dict[str, tuple[str, str]]:
    """``{"train": (images, annotations), "val": (...)}``; generates nothing.

    With ``data.shapes`` set, the shapes dataset's paths under its ``root`` fill the
    ``data.train``/``data.val`` entries left null (``ensure_dataset`` writes it there).
    Relative paths are relative to the working directory.

    Args:
        data: the ``data`` section.

    Raises:
        ValueError: a split has no images or annotations path and no shapes section fills it.

    Example:
        >>> data_paths(load_config("configs/shapes_retinanet_r18.yaml").data)["val"]
        ('data/shapes/val', 'data/shapes/annotations/instances_val.json')
    """
    root = None if data.shapes is None else Path(data.shapes.get("root", DEFAULT_SHAPES_ROOT))
    paths = {}
    for split in _SPLITS:
        given = getattr(data, split)
        images = given.images or (None if root is None else str(root / split))
        annotations = given.annotations or (None if root is None else str(root / "annotations" /
                                                                          f"instances_{split}.json"))
        if images is None or annotations is None:
            raise ValueError(f"data.{split}: needs 'images' and 'annotations' paths (or a data.shapes section), "
                             f"got images={given.images!r}, annotations={given.annotations!r}")
        paths[split] = (images, annotations)
    return paths


def dataset_kwargs(cfg: Config, images: str, annotations: str) -> dict[str, Any]:
    """Keyword arguments of ``CocoDetection`` (without transforms) for one split."""
    return {"images_dir": images, "annotation_file": annotations,
            "categories": None if cfg.data.subset.categories is None else list(cfg.data.subset.categories),
            "max_images": cfg.data.subset.max_images, "seed": cfg.train.seed}


def transform_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of ``build_transforms`` for training."""
    augment = cfg.data.augment
    return {"hflip": augment.hflip, "photometric": augment.photometric,
            "scale_jitter": None if augment.scale_jitter is None else tuple(augment.scale_jitter)}


def model_kwargs(cfg: Config, num_classes: int) -> dict[str, Any]:
    """Keyword arguments of the ``model.type`` builder (``build_retinanet``): every ``model`` key but
    ``type`` and ``weights`` (loaded by the training loop after the build)."""
    model = {key: value for key, value in config_to_dict(cfg)["model"].items()
             if key not in ("type", "num_classes", "weights")}
    return {"num_classes": num_classes, **model, "score_thresh": cfg.eval.score_thresh,
            "detections_per_img": cfg.eval.detections_per_img}


def optimizer_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of ``engine.build_optimizer`` (besides the model)."""
    train = cfg.train
    return {"name": train.optimizer, "lr": train.lr, "momentum": train.momentum, "weight_decay": train.weight_decay}


def scheduler_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of ``engine.optim.build_lr_schedule`` (besides total_iters)."""
    train = cfg.train
    return {"warmup_iters": train.warmup_iters, "warmup_factor": train.warmup_factor,
            "schedule": train.schedule.type, "steps": list(train.schedule.steps), "gamma": train.schedule.gamma,
            "min_lr_factor": train.schedule.min_lr_factor}
