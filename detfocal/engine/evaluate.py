"""COCO evaluation of a detector: :func:`evaluate` over a loader (training and ``detfocal eval``)
and :func:`evaluate_checkpoint`, the function behind ``detfocal eval``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

__all__ = ["check_categories", "evaluate", "evaluate_checkpoint"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, evaluator: Any, device: torch.device, *, is_main: bool = True,
             progress: bool = True) -> dict[str, Any]:
    """Run the detector over ``loader`` in fp32, gather predictions across processes and summarize.

    Args:
        model: the detector, not DDP-wrapped (inference needs no gradient sync).
        loader: yields ``(images, targets)``; each rank sees its own share of the images.
        evaluator: a ``CocoEvaluator`` (``update``, ``synchronize``, ``summarize``).
        device: where the images go.
        is_main: rank 0 summarizes.
        progress: show a progress bar (rank 0).

    Returns:
        On the main process, ``evaluator.summarize()``: the 12 COCO stats and ``per_class``;
        ``{}`` on the other ranks.
    """
    was_training = model.training
    model.eval()
    for images, targets in tqdm(loader, desc="eval", disable=not (is_main and progress), dynamic_ncols=True,
                                leave=False):
        outputs = model([image.to(device, non_blocking=True) for image in images])
        evaluator.update({target["image_id"]: {k: v.float().cpu() for k, v in output.items()}
                          for target, output in zip(targets, outputs)})
    evaluator.synchronize()  # a collective: every rank must reach it
    model.train(was_training)
    return evaluator.summarize() if is_main else {}


def _listed(items: Sequence[str], most: int = 5) -> str:
    return ", ".join(items[:most]) + (f" (+{len(items) - most} more)" if len(items) > most else "")


def check_categories(label_to_category_id: Sequence[int], category_names: Sequence[str],
                     dataset: Mapping[str, Any], *, checkpoint: str, annotations: str) -> None:
    """Compare a checkpoint's categories with the annotations it is evaluated on.

    Classes are matched by category id, so the names are the only sign that the ids mean
    the same objects in both. Differences are logged as one warning that lists them.

    Args:
        label_to_category_id: the checkpoint's category id per label.
        category_names: the checkpoint's name per label.
        dataset: the COCO dict of the annotations.
        checkpoint: the checkpoint's path, for the messages.
        annotations: the annotation file's path, for the messages.

    Raises:
        ValueError: no category has the same id and name in both, or an id of the
            checkpoint is not in the annotations (nothing to evaluate it against).
    """
    stored = dict(zip(label_to_category_id, category_names))
    given = {category["id"]: category["name"] for category in dataset["categories"]}
    same = [category_id for category_id, name in stored.items() if given.get(category_id) == name]
    absent = [f"{category_id} {name!r}" for category_id, name in stored.items() if category_id not in given]
    if not same or absent:
        mine = _listed([f"{category_id} {name!r}" for category_id, name in stored.items()])
        theirs = _listed([f"{category_id} {name!r}" for category_id, name in given.items()])
        problem = (f"ids {_listed(absent)} are not in the annotations" if absent else
                   "no category has the same id and name in both")
        raise ValueError(f"checkpoint {checkpoint} does not fit the annotations {annotations}: {problem} "
                         f"(classes are matched by id); checkpoint: {mine}; annotations: {theirs}")
    renamed = [f"{category_id} {name!r} (annotations: {given[category_id]!r})"
               for category_id, name in stored.items() if category_id in given and given[category_id] != name]
    left_out = [f"{category_id} {name!r}" for category_id, name in given.items() if category_id not in stored]
    differences = []
    if renamed:
        differences.append(f"another name for {len(renamed)} id(s): {_listed(renamed)}")
    if left_out:
        differences.append(f"{len(left_out)} categorie(s) of the annotations are not the model's and are left out: "
                           f"{_listed(left_out)}")
    if differences:
        logger.warning("the categories of checkpoint %s differ from those of %s (classes are matched by id): %s",
                       checkpoint, annotations, "; ".join(differences))


def evaluate_checkpoint(checkpoint: str | Path, config: str | Path | None = None, *, overrides: Sequence[str] = (),
                        out_dir: str | Path | None = None) -> dict[str, Any]:
    """COCO-evaluate a checkpoint on its config's val split; the function behind ``detfocal eval``.

    Writes ``metrics.json``, ``results.json``, ``per_class.csv``, ``per_class_ap.png`` and
    ``pr_curves.png`` to ``out_dir`` (default ``<checkpoint folder>/eval``). Data is generated
    only for a config the user names, never for one stored in the checkpoint. The
    checkpoint's category names are checked against the annotations' (see
    :func:`check_categories`).

    Args:
        checkpoint: a checkpoint written by ``detfocal train``.
        config: a YAML config to use instead of the stored one.
        overrides: ``key=value`` config overrides.
        out_dir: the output folder.

    Returns:
        The summary: the 12 COCO stats and ``per_class``.

    Raises:
        FileNotFoundError: the checkpoint or the data does not exist.
        ValueError: a bad checkpoint, config or output folder, or annotations whose
            categories do not fit the checkpoint's.

    Example:
        >>> summary = evaluate_checkpoint("runs/shapes_retinanet_r18/best.pth")
        >>> summary["AP"]
    """
    from torch.utils.data import DataLoader

    from detfocal.config import data_paths, dataset_kwargs, shapes_kwargs
    from detfocal.data import CocoDetection, build_transforms, collate_fn, load_coco_annotations
    from detfocal.data.shapes import ensure_dataset
    from detfocal.engine.checkpoint import load_checkpoint
    from detfocal.engine.loading import load_model
    from detfocal.engine.workers import resolve_workers
    from detfocal.evaluation.coco import CocoEvaluator
    from detfocal.evaluation.plots import write_reports
    from detfocal.utils.io import ensure_writable_dir, write_json_atomic

    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    out_path = Path(out_dir) if out_dir is not None else checkpoint.parent / "eval"
    if (out_path / "metrics.jsonl").exists() or (out_path / "run.json").exists():
        raise ValueError(f"--out-dir {out_path} holds a training run, whose metrics.json and results.json an "
                         f"evaluation would replace; choose another folder (default: <checkpoint folder>/eval)")
    out = ensure_writable_dir(out_path, "--out-dir")
    model, info = load_model(state, config, overrides=overrides, source=str(checkpoint))
    cfg = info["config"]
    if config is not None and shapes_kwargs(cfg) is not None:  # never for a config read from the checkpoint
        ensure_dataset(**shapes_kwargs(cfg))
    images, annotations = data_paths(cfg.data)["val"]
    dataset_dict = load_coco_annotations(annotations)
    check_categories(info["label_to_category_id"], info["category_names"], dataset_dict, checkpoint=str(checkpoint),
                     annotations=annotations)
    # The model's own categories, so its labels and the ground truth's ids line up.
    kwargs = dataset_kwargs(cfg, images, annotations) | {"categories": info["label_to_category_id"]}
    dataset = CocoDetection(**kwargs, transforms=build_transforms(train=False),
                            skip_bad_images=cfg.data.skip_bad_images)
    device = next(model.parameters()).device
    workers, workers_note = resolve_workers(cfg.data.workers, dataset, cfg.eval.batch_size, collate_fn, model, device,
                                            training=False)
    if workers_note:
        logger.info(workers_note)
    loader = DataLoader(dataset, batch_size=cfg.eval.batch_size, num_workers=workers, collate_fn=collate_fn)
    logger.info("evaluating %s (step %s) on %d images of %s, %d categories", checkpoint, info["iteration"],
                len(dataset), annotations, len(info["label_to_category_id"]))
    evaluator = CocoEvaluator(dataset.coco, info["label_to_category_id"], backend=cfg.eval.backend)
    summary = evaluate(model, loader, evaluator, device, progress=True)
    written = [write_json_atomic(out / "metrics.json", summary), evaluator.write_results(out / "results.json"),
               *write_reports(evaluator, out)]
    logger.info("wrote: %s", ", ".join(str(path) for path in written))
    return summary
