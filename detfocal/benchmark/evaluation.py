"""The eval and inference cases: COCO evaluation backends, and the demo's evaluation by component."""
from __future__ import annotations

import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

from .timing import add_seconds, around_method, around_module

def eval_case(spec: dict[str, Any]) -> dict[str, Any]:
    from detfocal.evaluation.coco import STAT_NAMES, evaluate_results

    data = Path(spec["data_dir"])
    gt, results = data / "instances_val2014_100.json", data / "instances_val2014_fakebbox100_results.json"
    evaluate_results(gt, results, backend=spec["impl"])  # warm-up: imports, page cache
    times = []
    for _ in range(spec["repeats"]):
        # Everything a run pays: read both jsons, index, loadRes, evaluate, accumulate, summarize.
        start = time.perf_counter()
        summary = evaluate_results(gt, results, backend=spec["impl"])
        times.append(time.perf_counter() - start)
    return {"median_ms": statistics.median(times) * 1000, "AP": summary["AP"],
            "stats": [summary[name] for name in STAT_NAMES]}


INFERENCE_ROWS = ("data loading + transforms", "model transform (normalize, batch)", "backbone + FPN", "head convs",
                  "anchor generation", "post-processing (score filter, per-level top-k, batched_nms)",
                  "box rescale", "COCO update + evaluate")


def inference_case(spec: dict[str, Any]) -> dict[str, Any]:
    """The demo's evaluation (val images, eval batch size) split into data, model stages and COCO eval."""
    import tempfile

    import torch
    from torch.utils.data import DataLoader

    from detfocal.config import load_config, model_kwargs
    from detfocal.data import CocoDetection, build_transforms, collate_fn, shapes
    from detfocal.engine.loading import load_model
    from detfocal.evaluation.coco import CocoEvaluator
    from detfocal.utils.registry import DETECTORS

    cfg = load_config(spec["config"])
    params = {key: value for key, value in dict(cfg.data.shapes or {}).items()
              if key in ("image_size", "min_object_size", "max_objects", "seed")}
    if spec.get("checkpoint"):
        model = load_model(spec["checkpoint"], device="cpu")[0]
        source = spec["checkpoint"]
    else:
        torch.manual_seed(cfg.train.seed)
        from detfocal.data.shapes import CATEGORIES

        model = DETECTORS.build({"type": cfg.model.type, **model_kwargs(cfg, len(CATEGORIES))})
        source = "an untrained model (few scores pass score_thresh: pass --checkpoint for a trained one)"
    model.eval()
    totals: dict[str, float] = {}
    for module, label in ((model.transform, INFERENCE_ROWS[1]), (model.backbone, INFERENCE_ROWS[2]),
                          (model.head, INFERENCE_ROWS[3]), (model.anchor_generator, INFERENCE_ROWS[4])):
        around_module(module, partial(add_seconds, totals, label))
    around_method(model, "postprocess_detections", partial(add_seconds, totals, INFERENCE_ROWS[5]))
    around_method(model.transform, "postprocess", partial(add_seconds, totals, INFERENCE_ROWS[6]))
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        paths = shapes.generate(Path(folder) / "shapes", num_train=0, num_val=spec["num_images"], **params)
        dataset = CocoDetection(paths["val_images"], paths["val_annotations"], transforms=build_transforms(train=False))
        for repeat in range(spec["repeats"] + 1):  # the first is a warm-up
            totals.clear()
            loader = iter(DataLoader(dataset, batch_size=cfg.eval.batch_size, collate_fn=collate_fn))
            evaluator = CocoEvaluator(dataset.coco, dataset.label_to_category_id, backend=cfg.eval.backend)
            start = time.perf_counter()
            detections = 0
            with torch.no_grad():
                while True:
                    try:
                        with add_seconds(totals, INFERENCE_ROWS[0]):
                            images, targets = next(loader)
                    except StopIteration:
                        break
                    outputs = model(images)
                    detections += sum(len(output["boxes"]) for output in outputs)
                    with add_seconds(totals, INFERENCE_ROWS[7]):
                        evaluator.update({target["image_id"]: {k: v.float() for k, v in output.items()}
                                          for target, output in zip(targets, outputs)})
            with add_seconds(totals, INFERENCE_ROWS[7]):
                summary = evaluator.summarize()
            if repeat:
                runs.append({"seconds": time.perf_counter() - start, **totals})
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    return {"source": source, "num_images": len(dataset), "batch": cfg.eval.batch_size, "detections": detections,
            "AP": summary["AP"], "seconds": median["seconds"], "images_per_s": len(dataset) / median["seconds"],
            "rows": {name: 1000 * median.get(name, 0.0) for name in INFERENCE_ROWS}}


def inference_table(result: dict[str, Any]) -> str:
    """The inference case as markdown: ms per pass over the val images, and %."""
    total = 1000 * result["seconds"]
    lines = ["| component | ms for all images | % |", "|---|---:|---:|"]
    for name in INFERENCE_ROWS:
        lines.append(f"| {name} | {result['rows'][name]:.1f} | {100 * result['rows'][name] / total:.1f} |")
    lines.append(f"| **total** | {total:.1f} | 100.0 |")
    lines += ["", f"{result['num_images']} images in batches of {result['batch']}: {result['images_per_s']:.1f} "
              f"images/s, {result['detections']} detections, AP {result['AP']:.3f}; model: {result['source']}."]
    return "\n".join(lines)
