"""Running a trained detector: :func:`load_model` (used by eval, infer and export), COCO
evaluation of a loader or a checkpoint, and drawing detections on images."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

__all__ = ["draw_detections", "evaluate", "evaluate_checkpoint", "load_model", "predict_images"]

# Tableau's 10 colours: one per class (cycled), so a class keeps its colour across images.
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]
MAX_DRAW_SIZE = 4096  # px: --min-draw-size above this would only allocate huge images


def draw_detections(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, names: Sequence[str], *,
                    scores: torch.Tensor | None = None, gt_boxes: torch.Tensor | None = None,
                    min_draw_size: int = 0) -> torch.Tensor:
    """Draw boxes with class names (and scores) on an image; ground truth, if given, in white.

    Args:
        image: float ``[3, H, W]`` in [0, 1].
        boxes, labels: ``[K, 4]`` (x1, y1, x2, y2) and ``[K]`` detections.
        names: class name per label.
        scores: ``[K]``, shown next to the names.
        gt_boxes: ``[G, 4]`` ground-truth boxes.
        min_draw_size: enlarge a smaller image by a whole factor until its longer side reaches
            this many pixels (the label font is a fixed ~11 px, which would cover a 128 px image);
            pixel repetition keeps the pixels crisp and the boxes exact.

    Returns:
        uint8 ``[3, H', W']``.
    """
    from torchvision.utils import draw_bounding_boxes

    from detfocal.data import to_uint8

    drawn = to_uint8(image)
    factor = max(1, -(-min_draw_size // max(drawn.shape[1:])))  # ceil division
    if factor > 1:
        drawn = drawn.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    if gt_boxes is not None and len(gt_boxes):
        drawn = draw_bounding_boxes(drawn, gt_boxes.float() * factor, colors="white", width=1)
    if len(boxes):
        label_list = labels.tolist()
        texts = [names[label] if label < len(names) else str(label) for label in label_list]
        if scores is not None:
            texts = [f"{text} {score:.2f}" for text, score in zip(texts, scores.tolist())]
        drawn = draw_bounding_boxes(drawn, boxes.float() * factor, labels=texts, width=2,
                                    colors=[PALETTE[label % len(PALETTE)] for label in label_list])
    return drawn


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


def load_model(checkpoint: str | Path | Mapping[str, Any], config: str | Path | None = None, *,
               overrides: Sequence[str] = (), device: torch.device | str | None = None, source: str | None = None,
               **model_kwargs_override: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build the detector a training checkpoint holds and load its weights, in eval mode.

    The config comes from ``config`` (a YAML file the user names; its ``imports`` run) or
    else from the checkpoint, whose stored config is data only: it never imports a module or
    generates data. A type it names that is not registered raises an error saying which
    module to import.

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
        ValueError: it is unreadable, not a detfocal checkpoint, or does not fit the model.

    Example:
        >>> model, info = load_model("runs/shapes_retinanet_r18/best.pth")
        >>> detections = model([image])[0]
    """
    from detfocal.config import config_from_dict, load_config, model_kwargs
    from detfocal.engine.checkpoint import check_compatible, load_checkpoint, load_weights
    from detfocal.utils.registry import DETECTORS

    source = source or ("<dict>" if isinstance(checkpoint, Mapping) else str(checkpoint))
    state = checkpoint if isinstance(checkpoint, Mapping) else load_checkpoint(checkpoint)
    if "config" not in state:
        raise ValueError(f"checkpoint {source} is not a detfocal training checkpoint: it has no 'config' "
                         f"(it holds {sorted(state)[:8]})")
    cfg = load_config(config, overrides) if config is not None else config_from_dict(state["config"], overrides)
    check_compatible(state, cfg, int(state.get("num_classes", -1)), source=source, resuming=False)
    kwargs = model_kwargs(cfg, int(state["num_classes"])) | {"weights_backbone": None} | model_kwargs_override
    model = DETECTORS.get(cfg.model.type)(**kwargs)  # weights come from the checkpoint: no download
    load_weights(model, state.get("ema") or state["model"], source=source)  # the EMA weights when trained with one
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {"config": cfg, "num_classes": int(state["num_classes"]),
            "label_to_category_id": list(state["label_to_category_id"]),
            "category_names": list(state["category_names"]),
            "iteration": state.get("iteration", state.get("global_step")), "epoch": state.get("epoch")}
    return model.to(device).eval(), info


def evaluate_checkpoint(checkpoint: str | Path, config: str | Path | None = None, *, overrides: Sequence[str] = (),
                        out_dir: str | Path | None = None) -> dict[str, Any]:
    """COCO-evaluate a checkpoint on its config's val split; the function behind ``detfocal eval``.

    Writes ``metrics.json``, ``results.json``, ``per_class.csv``, ``per_class_ap.png`` and ``pr_curves.png`` to
    ``out_dir`` (default ``<checkpoint folder>/eval``). Data is generated only for a config the
    user names, never for one stored in the checkpoint.

    Returns:
        The summary: the 12 COCO stats and ``per_class``.
    """
    from torch.utils.data import DataLoader

    from detfocal.config import data_paths, dataset_kwargs
    from detfocal.data import CocoDetection, build_transforms, collate_fn
    from detfocal.engine.logging import format_summary
    from detfocal.evaluation.coco import CocoEvaluator
    from detfocal.evaluation.plots import write_reports
    from detfocal.engine.checkpoint import load_checkpoint
    from detfocal.engine.workers import resolve_workers
    from detfocal.utils.io import ensure_writable_dir, write_json_atomic

    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    out = ensure_writable_dir(out_dir if out_dir is not None else checkpoint.parent / "eval", "--out-dir")
    model, info = load_model(state, config, overrides=overrides, source=str(checkpoint))
    cfg = info["config"]
    images, annotations = data_paths(cfg.data, generate=config is not None)["val"]
    # The model's own categories, so its labels and the ground truth's ids line up.
    kwargs = dataset_kwargs(cfg, images, annotations) | {"categories": info["label_to_category_id"]}
    dataset = CocoDetection(**kwargs, transforms=build_transforms(train=False),
                            skip_bad_images=cfg.data.skip_bad_images)
    device = next(model.parameters()).device
    workers, workers_note = resolve_workers(cfg.data.workers, dataset, cfg.eval.batch_size, collate_fn, model, device,
                                            training=False)
    if workers_note:
        print(workers_note)
    loader = DataLoader(dataset, batch_size=cfg.eval.batch_size, num_workers=workers, collate_fn=collate_fn)
    print(f"evaluating {checkpoint} (step {info['iteration']}) on {len(dataset)} images of {annotations}, "
          f"{len(info['label_to_category_id'])} categories")
    evaluator = CocoEvaluator(dataset.coco, info["label_to_category_id"], backend=cfg.eval.backend)
    summary = evaluate(model, loader, evaluator, device, progress=True)
    print(format_summary(summary))
    written = [write_json_atomic(out / "metrics.json", summary), evaluator.write_results(out / "results.json"),
               *write_reports(evaluator, out)]
    print("wrote: " + ", ".join(str(path) for path in written))
    return summary


@torch.no_grad()
def predict_images(checkpoint: str | Path, images: Sequence[str | Path], out_dir: str | Path, *,
                   score_thresh: float = 0.5, min_draw_size: int = 512) -> list[dict[str, Any]]:
    """Detect objects in image files and draw them; the function behind ``detfocal infer``.

    Args:
        checkpoint: a training checkpoint.
        images: PNG or JPEG files (8- or 16-bit, grey, palette or colour).
        out_dir: folder for the drawn PNGs (one per input; same-named inputs get ``_1``, ...).
        score_thresh: lowest score kept, in [0, 1].
        min_draw_size: enlarge smaller images by a whole factor until their longer side reaches
            this many pixels before drawing, so labels stay readable; 0 draws at input size.

    Returns:
        Per image: ``{"image", "output", "boxes", "scores", "labels", "names"}``.

    Raises:
        ValueError: a bad threshold or draw size, an undecodable image, a bad checkpoint.
        FileNotFoundError: an image or the checkpoint does not exist.
    """
    from PIL import Image

    from detfocal.data import load_image
    from detfocal.utils.io import ensure_writable_dir

    if not 0.0 <= score_thresh <= 1.0:
        raise ValueError(f"--score-thresh: expected a score in [0, 1], got {score_thresh}")
    if not 0 <= min_draw_size <= MAX_DRAW_SIZE:
        raise ValueError(f"--min-draw-size: expected pixels in [0, {MAX_DRAW_SIZE}], got {min_draw_size}")
    paths = [Path(path) for path in images]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"image {missing[0]} does not exist" +
                                (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    out = ensure_writable_dir(out_dir, "--out")
    model, info = load_model(checkpoint, score_thresh=score_thresh)
    device = next(model.parameters()).device
    names = info["category_names"]
    used: set[str] = set()
    results = []
    for path in paths:
        image = load_image(path)  # float [3, H, W] in [0, 1], 8- or 16-bit sources alike
        detections = model([image.to(device)])[0]
        keep = detections["scores"] >= score_thresh
        boxes, scores, labels = (detections[key][keep].cpu() for key in ("boxes", "scores", "labels"))
        label_names = [names[label] if label < len(names) else str(label) for label in labels.tolist()]
        drawn = draw_detections(image, boxes, labels, names, scores=scores, min_draw_size=min_draw_size)
        stem, index = path.stem, 1
        while stem in used:  # same-named inputs from different folders must not overwrite each other
            stem, index = f"{path.stem}_{index}", index + 1
        used.add(stem)
        target = out / f"{stem}.png"
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(target)
        found = ", ".join(sorted(set(label_names))) or "nothing"
        print(f"{path}: {len(boxes)} detections ({found}) -> {target}")
        results.append({"image": path, "output": target, "boxes": boxes, "scores": scores, "labels": labels,
                        "names": label_names})
    return results
