"""Benchmark detfocal's focal loss, head and training step against torchvision.

Each case runs in its own subprocess, so its peak memory is its own. Prints markdown
tables and writes JSON. Uses only the standard library, torch and torchvision (plus
detfocal itself).

    detfocal benchmark                 # all cases, full size (~15 min on 2 cores)
    detfocal benchmark --quick         # smaller inputs, under 2 minutes
    detfocal benchmark --cases loss,scaling --json out.json

Cases:
    loss      focal loss forward+backward at COCO scale: B=2, N=anchors of 800x1333 (P3-P7, 9 per
              location), C=80, ~100 positives and 1% ignored per image.
    scaling   the compiled loss at N/4, N, 4N and C = 20, 80, 365; fitted exponent of time vs N*C.
    train     RetinaNet training-step images/s, detfocal head vs torchvision's, fp32 and the CPU default.
    eval      COCO evaluation time on the shared real sample (100 images): pycocotools against
              faster-coco-eval, each loading, evaluating, accumulating and summarizing.
    profile   the demo's training step (configs/shapes_retinanet_r18.yaml: R18 from scratch, FPN 64,
              GN heads, 128 px, batch 8, on CPU) under torch.profiler, split by component: data,
              backbone, FPN, head convs, anchors, matching, target encoding, losses, optimizer.
              2 warm-up steps, then --repeats profiled steps (mean); --quick: batch 2, 3 steps.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from detfocal.cli import run_cli
from detfocal.engine.precision import cpu_description

FEATURE_STRIDES = (8, 16, 32, 64, 128)
# Where the eval case finds the real 100-image COCO sample, relative to the working directory.
COCO_SAMPLE_DIRS = (Path("../shared/data/coco_val2014_100"), Path("tests/data"))
# The profile case's model, data and optimizer: the demo's.
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes_retinanet_r18.yaml"
CASES = ("loss", "scaling", "train", "eval", "inference", "profile")


def coco_num_anchors(height: int = 800, width: int = 1333, anchors_per_location: int = 9) -> int:
    """Anchors torchvision's RetinaNet makes for one image (padded to a multiple of 32)."""
    height, width = (math.ceil(s / 32) * 32 for s in (height, width))
    return anchors_per_location * sum(math.ceil(height / s) * math.ceil(width / s) for s in FEATURE_STRIDES)


# ------------------------------------------------------------------------------- worker side
class PeakRSS:
    """Samples this process's resident memory in a thread; ``extra_mb`` is the peak above the start."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _time(fn: Callable[[], Any], repeats: int, device: str) -> tuple[float, float, float]:
    """(first-call seconds, median ms, peak extra MB) of ``fn``."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with PeakRSS() as meter:
            fn()
        extra = meter.extra_mb
    return first, statistics.median(times) * 1000, extra


def _loss_inputs(batch: int, num_anchors: int, num_classes: int, device: str, seed: int = 0) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, num_anchors, num_classes, generator=generator) * 2 - 4).to(device)
    matched_idxs, labels_per_image, targets = [], [], []
    num_boxes = 10
    for _ in range(batch):
        matched = torch.full((num_anchors,), -1, dtype=torch.long)
        order = torch.randperm(num_anchors, generator=generator)
        matched[order[:100]] = torch.randint(0, num_boxes, (100,), generator=generator)  # ~100 positives
        matched[order[100:100 + num_anchors // 100]] = -2  # 1% between the IoU thresholds
        box_labels = torch.randint(0, num_classes, (num_boxes,), generator=generator)
        matched_idxs.append(matched.to(device))
        targets.append({"labels": box_labels.to(device)})
        label = torch.where(matched >= 0, box_labels[matched.clamp(min=0)], torch.full_like(matched, num_classes))
        labels_per_image.append(torch.where(matched == -2, torch.full_like(label, -1), label))
    labels = torch.stack(labels_per_image).to(device)
    return {"logits": logits, "labels": labels, "matched_idxs": matched_idxs, "targets": targets}


def _loss_case(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torchvision

    device = spec["device"]
    inputs = _loss_inputs(spec["batch"], spec["num_anchors"], spec["num_classes"], device)
    impl = spec["impl"]
    base = inputs["logits"].half() if impl.endswith("_fp16") else inputs["logits"]  # fp16: a GradScaler's path
    logits = base.clone().requires_grad_(True)
    if impl in ("detfocal_compiled", "detfocal_eager"):
        os.environ["DETFOCAL_COMPILE"] = "1" if impl == "detfocal_compiled" else "0"
        from detfocal.losses import sigmoid_focal_loss

        labels = inputs["labels"]

        def step() -> None:
            logits.grad = None
            num_foreground = (labels >= 0).logical_and(labels < base.shape[-1]).sum().clamp(min=1)
            sigmoid_focal_loss(logits, labels, 0.25, 2.0, "sum", normalizer=num_foreground).backward()
    elif impl in ("detfocal_head", "detfocal_head_fp16"):
        os.environ["DETFOCAL_COMPILE"] = spec.get("compile", "auto")
        from detfocal.modeling.heads import FocalClassificationHead

        head = FocalClassificationHead(8, 9, base.shape[-1]).to(device)

        scale = 2.0 ** 16 if impl.endswith("_fp16") else 1.0  # GradScaler's initial scale

        def step() -> None:
            logits.grad = None
            (head.compute_loss(inputs["targets"], {"cls_logits": logits}, inputs["matched_idxs"]) * scale).backward()
    elif impl == "torchvision_head":
        from torchvision.models.detection.retinanet import RetinaNetClassificationHead

        head = RetinaNetClassificationHead(8, 9, base.shape[-1]).to(device)

        def step() -> None:
            logits.grad = None
            head.compute_loss(inputs["targets"], {"cls_logits": logits}, inputs["matched_idxs"]).backward()
    elif impl in ("torchvision_ops_float", "detfocal_float"):
        one_hot = torch.zeros_like(base)
        labels = inputs["labels"]
        fg = (labels >= 0) & (labels < base.shape[-1])
        one_hot[fg, labels[fg]] = 1.0
        if impl == "detfocal_float":
            os.environ["DETFOCAL_COMPILE"] = spec.get("compile", "1")
            from detfocal.losses import sigmoid_focal_loss as loss_fn
        else:
            loss_fn = torchvision.ops.sigmoid_focal_loss

        def step() -> None:
            logits.grad = None
            loss_fn(logits, one_hot, 0.25, 2.0, "sum").backward()
    elif impl == "sigmoid_pass":
        def step() -> None:
            torch.sigmoid(base)
    else:
        raise ValueError(f"unknown impl {impl!r}")
    first, median_ms, extra_mb = _time(step, spec["repeats"], device)
    result = {"first_call_s": first, "median_ms": median_ms, "peak_extra_mb": extra_mb,
              "logits_mb": base.numel() * base.element_size() / 2**20}
    if impl.startswith("detfocal"):
        from detfocal.losses import backend

        result["backend"] = backend()
    return result


def torchvision_twin(model: Any) -> Any:
    """torchvision's stock ``RetinaNet`` with ``model``'s architecture and weights.

    Stock everywhere detfocal differs: ``AnchorGenerator`` (anchors rebuilt every step),
    per-image matching in ``RetinaNet.compute_loss``, ``RetinaNetClassificationHead`` (one-hot
    focal loss per image) and ``LastLevelP6P7``; the backbone, FPN and head convolutions are
    the same modules with the same weights.
    """
    import copy

    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import RetinaNetHead
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    from detfocal.modeling.retinanet import infer_norm_layer

    body = copy.deepcopy(model.backbone)
    extra = body.fpn.extra_blocks
    if isinstance(extra, LastLevelP6P7) and type(extra) is not LastLevelP6P7:
        body.fpn.extra_blocks = LastLevelP6P7(extra.p6.in_channels, extra.p6.out_channels)
    classification = model.head.classification_head
    num_anchors = model.anchor_generator.num_anchors_per_location()[0]
    num_classes = classification.cls_logits.out_channels // num_anchors
    head = RetinaNetHead(classification.cls_logits.in_channels, num_anchors, num_classes,
                         norm_layer=infer_norm_layer(classification.conv[0]) if len(classification.conv) else None)
    head.classification_head.conv = copy.deepcopy(classification.conv)  # torchvision fixes 4 convs; ours may differ
    stock = RetinaNet(body, num_classes, min_size=model.transform.min_size, max_size=model.transform.max_size,
                      anchor_generator=AnchorGenerator(model.anchor_generator.sizes, model.anchor_generator.aspect_ratios),
                      head=head, fg_iou_thresh=model.proposal_matcher.high_threshold,
                      bg_iou_thresh=model.proposal_matcher.low_threshold, score_thresh=model.score_thresh,
                      nms_thresh=model.nms_thresh, detections_per_img=model.detections_per_img,
                      topk_candidates=model.topk_candidates, image_mean=model.transform.image_mean,
                      image_std=model.transform.image_std)
    result = stock.load_state_dict(model.state_dict(), strict=False)
    if result.missing_keys or any(key != "head.classification_head.num_foreground_ema" for key in result.unexpected_keys):
        raise RuntimeError(f"torchvision twin: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    return stock.train(model.training)


def _train_model(spec: dict[str, Any]) -> tuple[Any, int, int, int]:
    """(detfocal model, image size, batch, classes) of a train spec: a named backbone or a config."""
    from detfocal.modeling.retinanet import build_retinanet

    if spec.get("config"):
        from detfocal.config import load_config, model_kwargs
        from detfocal.registry import DETECTORS

        cfg = load_config(spec["config"])
        from detfocal.data.shapes import CATEGORIES

        num_classes = len(CATEGORIES)
        model = DETECTORS.build({"type": cfg.model.type, **model_kwargs(cfg, num_classes)})
        return model, cfg.model.min_size, spec["batch"], num_classes
    size, num_classes = spec["size"], 80
    model = build_retinanet(num_classes, backbone=spec["backbone"], min_size=size, max_size=size,
                            head={"type": "focal"})
    return model, size, spec["batch"], num_classes


def _train_case(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from detfocal.engine.precision import resolve_amp

    torch.manual_seed(0)
    device = spec["device"]
    model, size, batch, num_classes = _train_model(spec)
    if spec["impl"] == "torchvision":
        model = torchvision_twin(model)
    # "default" is what train.amp: auto picks on this machine, the same call the training loop makes.
    amp_dtype, channels_last, note = resolve_amp("off" if spec["precision"] == "fp32" else "auto",
                                                 torch.device(device))
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    scaler = torch.amp.GradScaler(device, enabled=amp_dtype == torch.float16)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=generator).to(device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=generator) * size * 0.6
        wh = size / 8 + torch.rand(4, 2, generator=generator) * size * 0.3
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(0, num_classes, (4,), generator=generator).to(device)})

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            losses = model(images, targets)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()

    step()  # warm-up (and compile, where the loss compiles)
    first, median_ms, extra_mb = _time(step, spec["repeats"], device)
    return {"median_ms": median_ms, "images_per_s": batch / (median_ms / 1000), "peak_extra_mb": extra_mb,
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "auto_note": note if spec["precision"] == "default" else resolve_amp("auto", torch.device(device))[2]}


def _eval_case(spec: dict[str, Any]) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------- inference case
INFERENCE_ROWS = ("data loading + transforms", "model transform (normalize, batch)", "backbone + FPN", "head convs",
                  "anchor generation", "post-processing (score filter, per-level top-k, batched_nms)",
                  "box rescale", "COCO update + evaluate")


def _timed_module(module: Any, label: str, totals: dict[str, float]) -> None:
    """Add the wall time of every forward of ``module`` to ``totals[label]`` (module hooks)."""
    starts: list[float] = []
    module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))

    def leave(*_: Any) -> None:
        totals[label] = totals.get(label, 0.0) + time.perf_counter() - starts.pop()

    module.register_forward_hook(leave)


def _timed_method(owner: Any, name: str, label: str, totals: dict[str, float]) -> None:
    """Shadow ``owner.name`` with an instance attribute adding its wall time to ``totals[label]``."""
    method = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[label] = totals.get(label, 0.0) + time.perf_counter() - start

    setattr(owner, name, timed)


def _inference_case(spec: dict[str, Any]) -> dict[str, Any]:
    """The demo's evaluation (val images, eval batch size) split into data, model stages and COCO eval."""
    import tempfile

    import torch
    from torch.utils.data import DataLoader

    from detfocal.config import load_config, model_kwargs
    from detfocal.data import CocoDetection, build_transforms, collate_fn, shapes
    from detfocal.engine.inference import load_model
    from detfocal.evaluation.coco import CocoEvaluator
    from detfocal.registry import DETECTORS

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
    _timed_module(model.transform, INFERENCE_ROWS[1], totals)
    _timed_module(model.backbone, INFERENCE_ROWS[2], totals)
    _timed_module(model.head, INFERENCE_ROWS[3], totals)
    _timed_module(model.anchor_generator, INFERENCE_ROWS[4], totals)
    _timed_method(model, "postprocess_detections", INFERENCE_ROWS[5], totals)
    _timed_method(model.transform, "postprocess", INFERENCE_ROWS[6], totals)
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
                    batch_start = time.perf_counter()
                    try:
                        images, targets = next(loader)
                    except StopIteration:
                        break
                    totals[INFERENCE_ROWS[0]] = totals.get(INFERENCE_ROWS[0], 0.0) + time.perf_counter() - batch_start
                    outputs = model(images)
                    detections += sum(len(output["boxes"]) for output in outputs)
                    coco_start = time.perf_counter()
                    evaluator.update({target["image_id"]: {k: v.float() for k, v in output.items()}
                                      for target, output in zip(targets, outputs)})
                    totals[INFERENCE_ROWS[7]] = totals.get(INFERENCE_ROWS[7], 0.0) + time.perf_counter() - coco_start
            coco_start = time.perf_counter()
            summary = evaluator.summarize()
            totals[INFERENCE_ROWS[7]] += time.perf_counter() - coco_start
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


# ------------------------------------------------------------------------------- profile case
# The demo's training step, by component. Each label is a record_function range opened from the
# benchmark side only (module hooks, or per-instance wrappers of methods); the library carries no
# profiling code. A range's own time goes to the innermost label around it, and the backward of
# an op goes to the label its forward ran under (the autograd node's sequence number), so the
# rows partition the step.
STEP_RANGE = "detfocal.profile.step"
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
OTHER = "other (loss sum, grad norm and clip, sync, autograd engine)"
DATA = "data loading + transforms (decode, v2 transforms, collate)"
PROFILE_ROWS = (DATA, "model transform (normalize, batch)", "backbone", "FPN", "head convs", "anchor generation",
                "matching", "target encoding", "classification loss", "box loss", "optimizer step", OTHER)
# The non-convolution share: the work around the convolutions that detfocal's own code does.
NON_CONV_ROWS = ("matching", "target encoding", "classification loss", "box loss", DATA)


def _label_module(module: Any, label: str) -> None:
    """Open a record_function range named ``label`` around every forward of ``module`` (hooks)."""
    from torch.profiler import record_function

    open_ranges: list[Any] = []

    def enter(*_: Any) -> None:
        open_ranges.append(record_function(label))
        open_ranges[-1].__enter__()

    def leave(*_: Any) -> None:
        open_ranges.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def _label_method(owner: Any, name: str, label: str) -> None:
    """Shadow ``owner.name`` with an instance attribute that runs it inside a range ``label`` (if it has one)."""
    from torch.profiler import record_function

    method = getattr(owner, name, None)
    if method is None:  # torchvision's head has no labels_for_loss: its target encoding is inside its loss
        return

    def labelled(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return method(*args, **kwargs)

    setattr(owner, name, labelled)


def label_retinanet(model: Any) -> None:
    """Put the profile's record_function labels on a FocalRetinaNet, from outside the library."""
    _label_module(model.transform, "model transform (normalize, batch)")
    _label_module(model.backbone.body, "backbone")
    _label_module(model.backbone.fpn, "FPN")
    _label_module(model.head, "head convs")
    _label_module(model.anchor_generator, "anchor generation")
    # compute_loss minus the two head losses inside it is the crowd split and the matching.
    _label_method(model, "compute_loss", "matching")
    _label_method(model.head.classification_head, "compute_loss", "classification loss")
    _label_method(model.head.classification_head, "labels_for_loss", "target encoding")
    _label_method(model.head.regression_head, "compute_loss", "box loss")
    _label_method(model.head.regression_head.box_coder, "encode_single", "target encoding")


def attribute_profile(events: Sequence[Any], labels: Sequence[str]) -> tuple[dict[str, list[float]], float, int]:
    """Split the self CPU time of the ``STEP_RANGE`` ranges of a profile among ``labels``.

    Args:
        events: ``torch.profiler.profile(...).events()``.
        labels: the record_function names that are rows; names starting with "Optimizer."
            (torch's own optimizer ranges) count as "optimizer step".

    Returns:
        ``({row: [total us, backward us]}, step us summed over the steps, number of steps)``.
        An event belongs to the innermost label around it; a backward node
        (``autograd::engine::evaluate_function: ...``) to the label its forward op ran
        under; anything else in a step to ``OTHER``.
    """
    label_set = set(labels)
    times: dict[str, list[float]] = {}
    label_of_sequence: dict[int, str] = {}
    step_us, steps = 0.0, 0

    def visit(event: Any, label: str | None, backward: bool) -> None:
        nonlocal step_us, steps
        name = event.name
        if name == STEP_RANGE:
            label, backward = OTHER, False
            step_us += event.cpu_time_total
            steps += 1
        elif label is None:  # outside every step
            pass
        elif name.startswith(BACKWARD_PREFIX):
            label, backward = label_of_sequence.get(event.sequence_nr, OTHER), True
        elif name in label_set:
            label = name
        elif name.startswith("Optimizer."):
            label = "optimizer step"
        if label is not None:
            # Ops that make no autograd node also carry the next sequence number; the last op
            # holding it is the one that made the node.
            if not backward and event.sequence_nr >= 0:
                label_of_sequence[event.sequence_nr] = label
            row = times.setdefault(label, [0.0, 0.0])
            row[0] += event.self_cpu_time_total
            if backward:
                row[1] += event.self_cpu_time_total
        for child in sorted(event.cpu_children, key=lambda e: e.time_range.start):
            visit(child, label, backward)

    roots = sorted((e for e in events if e.cpu_parent is None), key=lambda e: e.time_range.start)
    for root in roots:
        visit(root, None, False)
    return times, step_us, steps


def _time_data(dataset: Any, batches: list[list[int]]) -> dict[str, float]:
    """Median ms of ``dataset[i]`` for a batch plus ``collate_fn``, and of decoding alone, per batch and image."""
    from detfocal.data import collate_fn
    from detfocal.data.images import decode_image_file

    batch_ms, decode_ms = [], []
    for indices in batches:
        start = time.perf_counter()
        collate_fn([dataset[i] for i in indices])
        batch_ms.append((time.perf_counter() - start) * 1000)
        paths = [os.path.join(dataset.root, dataset.coco.imgs[dataset.ids[i]]["file_name"]) for i in indices]
        start = time.perf_counter()
        for path in paths:
            decode_image_file(path)
        decode_ms.append((time.perf_counter() - start) * 1000)
    size = len(batches[0])
    return {"data_ms": statistics.median(batch_ms), "data_ms_per_image": statistics.median(batch_ms) / size,
            "decode_ms_per_image": statistics.median(decode_ms) / size}


def _profile_case(spec: dict[str, Any]) -> dict[str, Any]:
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from detfocal.config import load_config, model_kwargs, optimizer_kwargs, transform_kwargs
    from detfocal.data import CocoDetection, build_transforms, collate_fn, shapes
    from detfocal.engine.optim import build_optimizer
    from detfocal.engine.precision import resolve_amp
    from detfocal.engine.train import train_step
    from detfocal.registry import DETECTORS

    cfg = load_config(spec["config"])
    batch, warmup, steps = spec["batch"], 2, spec["repeats"]
    torch.manual_seed(cfg.train.seed)
    params = {key: value for key, value in dict(cfg.data.shapes or {}).items()
              if key in ("image_size", "min_object_size", "max_objects", "seed")}
    with tempfile.TemporaryDirectory() as folder:
        paths = shapes.generate(Path(folder) / "shapes", num_train=batch * (warmup + steps), num_val=0, **params)
        dataset = CocoDetection(paths["train_images"], paths["train_annotations"],
                                transforms=build_transforms(train=True, **transform_kwargs(cfg)))
        batches = [list(range(i * batch, (i + 1) * batch)) for i in range(warmup + steps)]
        data = _time_data(dataset, batches[warmup:])
        loaded = [collate_fn([dataset[i] for i in indices]) for indices in batches]

    device = torch.device("cpu")  # the demo's device; CPU activities only
    model = DETECTORS.build({"type": cfg.model.type, **model_kwargs(cfg, dataset.num_classes)})
    if spec.get("impl") == "torchvision":
        model = torchvision_twin(model)
    model = model.to(device).train()
    amp_dtype, channels_last, amp_note = resolve_amp(cfg.train.amp, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, **optimizer_kwargs(cfg))
    scaler = torch.amp.GradScaler("cpu") if amp_dtype is torch.float16 else None  # as the training loop

    def step(images: list[Any], targets: list[Any]) -> None:
        train_step(model, images, targets, optimizer, amp_dtype=amp_dtype, scaler=scaler,
                   grad_clip=cfg.train.grad_clip)

    for images, targets in loaded[:warmup]:
        step(images, targets)
    wall_ms = []
    for images, targets in loaded[warmup:]:  # unprofiled, to show the profiler's overhead
        start = time.perf_counter()
        step(images, targets)
        wall_ms.append((time.perf_counter() - start) * 1000)
    label_retinanet(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for images, targets in loaded[warmup:]:
            with record_function(STEP_RANGE):
                step(images, targets)
    times, step_us, num_steps = attribute_profile(prof.events(), PROFILE_ROWS)
    rows = {name: [total / 1000 / num_steps, backward / 1000 / num_steps] for name, (total, backward) in times.items()}
    rows[DATA] = [data["data_ms"], 0.0]
    return {**data, "rows": rows, "step_ms": step_us / 1000 / num_steps,
            "unprofiled_step_ms": statistics.median(wall_ms), "amp": amp_note, "image_size": params.get("image_size")}


def profile_table(result: dict[str, Any]) -> str:
    """The profile as markdown: a row per component, ms per step (data + training step) and %."""
    rows = result["rows"]
    total = result["step_ms"] + rows[DATA][0]
    lines = ["| component | ms per step | of which backward | % of step |", "|---|---:|---:|---:|"]
    for name in PROFILE_ROWS:
        ms, backward = rows.get(name, [0.0, 0.0])
        lines.append(f"| {name} | {ms:.1f} | {backward:.1f} | {100 * ms / total:.1f} |")
    lines.append(f"| **total** | {total:.1f} | | 100.0 |")
    non_conv = sum(rows.get(name, [0.0])[0] for name in NON_CONV_ROWS)
    lines += ["", "A step is the training step plus loading its batch (data.workers: 0 loads in the loop); "
              "the training step's rows are means over the profiled steps, the data row a median.",
              f"Non-convolution share (matching + target encoding + losses + data): {non_conv:.1f} ms, "
              f"{100 * non_conv / total:.1f}% of the step.",
              f"Training step without the profiler: {result['unprofiled_step_ms']:.1f} ms (median); "
              f"with it: {result['step_ms']:.1f} ms (mean). Data: {result['data_ms_per_image']:.2f} ms per image, "
              f"of which decoding {result['decode_ms_per_image']:.2f} ms."]
    return "\n".join(lines)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    kind = spec["kind"]
    if kind == "loss":
        return _loss_case(spec)
    if kind == "train":
        return _train_case(spec)
    if kind == "eval":
        return _eval_case(spec)
    if kind == "profile":
        return _profile_case(spec)
    if kind == "inference":
        return _inference_case(spec)
    raise ValueError(f"unknown case kind {kind!r}")


# ------------------------------------------------------------------------------- driver side
def run_case(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one case in a fresh interpreter; its last stdout line is the JSON result."""
    # A fixed mmap threshold makes glibc return every large free to the OS at once, so the
    # sampled RSS follows live tensor memory instead of the allocator's cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-m", "detfocal.benchmark", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**spec, "error": tail}
    return {**spec, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _fmt(value: float | None, pattern: str = "{:.1f}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def loss_table(rows: list[dict[str, Any]]) -> str:
    by_impl = {r["impl"]: r for r in rows if "error" not in r}
    tv = by_impl.get("torchvision_head", {}).get("median_ms")
    sig = by_impl.get("sigmoid_pass", {}).get("median_ms")
    lines = ["| implementation | median ms | vs torchvision head | vs one sigmoid pass | peak extra MB | x logits bytes |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | error: {r['error']} | | | | |")
            continue
        ms = r["median_ms"]
        lines.append(
            f"| {r['impl']} | {ms:.1f} | {_fmt(tv / ms if tv else None, '{:.1f}x')} | "
            f"{_fmt(ms / sig if sig else None, '{:.2f}x')} | {r['peak_extra_mb']:.0f} | "
            f"{r['peak_extra_mb'] / r['logits_mb']:.2f} |")
    return "\n".join(lines)


def train_table(rows: list[dict[str, Any]]) -> str:
    """Rows of (torchvision, detfocal) pairs as markdown, plus each model's default precision against fp32."""
    lines = ["| model | px | batch | precision | torchvision img/s | detfocal img/s | ratio |",
             "|---|---:|---:|---|---:|---:|---:|"]
    fp32_stock: dict[str, float] = {}
    notes = []
    for stock, ours in zip(rows[0::2], rows[1::2]):
        name = stock.get("model") or stock["backbone"]
        s, o = stock.get("images_per_s"), ours.get("images_per_s")
        precision = ours.get("amp") or stock["precision"]
        lines.append(f"| {name} | {stock['size']} | {stock['batch']} | {precision} | {_fmt(s, '{:.2f}')} | "
                     f"{_fmt(o, '{:.2f}')} | {_fmt(o / s if s and o else None, '{:.2f}')} |")
        if stock["precision"] == "fp32" and s:
            fp32_stock[name] = s
        elif o and fp32_stock.get(name):
            notes.append(f"{name}: detfocal in the default precision ({precision}) is "
                         f"{o / fp32_stock[name]:.2f}x torchvision in fp32")
    if rows and not any(r["precision"] == "default" for r in rows):
        note = next((r.get("auto_note") for r in rows if r.get("auto_note")), "")
        notes.append("The default precision here is fp32 (train.amp: auto" +
                     (f"; {note.split('(', 1)[1].rstrip(')')}" if "(" in note else "") + "), so fp32 is the only row.")
    return "\n".join(lines + [""] + notes)


def fit_exponent(rows: list[dict[str, Any]]) -> float:
    """Least-squares slope of log(time) against log(N*C)."""
    points = [(math.log(r["num_anchors"] * r["num_classes"] * r["batch"]), math.log(r["median_ms"]))
              for r in rows if "error" not in r]
    if len(points) < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def build_specs(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    quick = args.quick
    n = coco_num_anchors() // (8 if quick else 1)
    repeats = 3 if quick else args.repeats
    common = {"device": args.device, "threads": args.threads}
    specs: dict[str, list[dict[str, Any]]] = {}
    if "loss" in args.cases:
        impls = ["detfocal_head", "detfocal_head_fp16", "detfocal_compiled", "detfocal_eager", "torchvision_head",
                 "detfocal_float", "torchvision_ops_float", "sigmoid_pass"]
        specs["loss"] = [{**common, "kind": "loss", "impl": impl, "batch": 2, "num_anchors": n, "num_classes": 80,
                          "repeats": repeats} for impl in impls]
    if "scaling" in args.cases:
        sizes = [(n // 4, 80), (n, 80), (4 * n, 80), (n, 20), (n, 365)]
        if quick:
            sizes = [(n // 4, 80), (n, 80), (n, 20)]
        specs["scaling"] = [{**common, "kind": "loss", "impl": "detfocal_compiled", "batch": 2, "num_anchors": na,
                             "num_classes": c, "repeats": repeats} for na, c in sizes]
    if "train" in args.cases:
        import torch

        from detfocal.engine.precision import resolve_amp

        settings = [{"backbone": "resnet18", "size": 256, "batch": 8}]
        if not quick:
            settings += [{"backbone": "resnet50", "size": 512, "batch": 2},
                         {"config": str(args.config or DEMO_CONFIG), "model": "demo (R18, FPN 64, GN heads)",
                          "size": 128, "batch": 8}]
        # "default" runs only where train.amp: auto picks something other than fp32.
        precisions = ["fp32"]
        if resolve_amp("auto", torch.device(args.device))[0] is not None:
            precisions.append("default")
        specs["train"] = [{**common, "kind": "train", **setting, "impl": impl, "precision": precision,
                           "repeats": 2 if quick else 5}
                          for setting in settings for precision in precisions
                          for impl in ("torchvision", "detfocal")]
    if "eval" in args.cases:
        candidates = [args.coco_sample] if args.coco_sample else COCO_SAMPLE_DIRS
        data_dir = next((Path(d) for d in candidates if (Path(d) / "instances_val2014_100.json").is_file()), None)
        if data_dir is None:
            raise ValueError(f"--coco-sample: no instances_val2014_100.json in {[str(d) for d in candidates]}; "
                             f"name the folder of the 100-image COCO sample")
        specs["eval"] = [{**common, "kind": "eval", "impl": backend, "data_dir": str(data_dir), "repeats": repeats}
                         for backend in ("pycocotools", "faster_coco_eval")]
    if "inference" in args.cases:
        config = args.config or DEMO_CONFIG
        if args.checkpoint is not None and not args.checkpoint.is_file():
            raise FileNotFoundError(f"--checkpoint: {args.checkpoint} does not exist; name a detfocal checkpoint, "
                                    f"e.g. runs/shapes_retinanet_r18/best.pth after the demo")
        specs["inference"] = [{**common, "kind": "inference", "config": str(config), "repeats": 2 if quick else 3,
                               "num_images": 48 if quick else 200,
                               "checkpoint": str(args.checkpoint) if args.checkpoint else None}]
    if "profile" in args.cases:
        config = args.config or DEMO_CONFIG
        if not Path(config).is_file():
            raise FileNotFoundError(f"--config: {config} does not exist; name the config of the profile case "
                                    f"(the demo's is configs/shapes_retinanet_r18.yaml in the repository)")
        from detfocal.config import load_config

        batch = 2 if quick else load_config(config).train.batch_size
        # torchvision's stock RetinaNet of the same architecture is the "before" of the breakdown.
        specs["profile"] = [{**common, "kind": "profile", "config": str(config), "batch": batch, "impl": impl,
                             "repeats": 3 if quick else args.repeats}
                            for impl in (("detfocal",) if quick else ("torchvision", "detfocal"))]
    return specs


def report(results: dict[str, list[dict[str, Any]]]) -> str:
    out = []
    if "loss" in results:
        r0 = results["loss"][0]
        out += [f"### Focal loss forward+backward, logits [{r0['batch']}, {r0['num_anchors']}, {r0['num_classes']}]",
                "", loss_table(results["loss"]), ""]
    if "scaling" in results:
        out += ["### Scaling of the compiled loss", "", "| N | C | median ms |", "|---:|---:|---:|"]
        out += [f"| {r['num_anchors']} | {r['num_classes']} | {_fmt(r.get('median_ms'))} |" for r in results["scaling"]]
        out += ["", f"Fitted exponent of time against N*C: {fit_exponent(results['scaling']):.2f} (1.0 = linear)", ""]
    if "train" in results:
        out += ["### RetinaNet training step: torchvision's stock RetinaNet against detfocal's, same weights", "",
                train_table(results["train"]), ""]
    if "eval" in results:
        rows = results["eval"]
        reference = rows[0]  # pycocotools
        out += ["### COCO evaluation on the 100-image real sample (load + evaluate + accumulate + summarize)", "",
                "| backend | median ms | speed-up vs pycocotools | AP |", "|---|---:|---:|---:|"]
        for r in rows:
            if "error" in r:
                out.append(f"| {r['impl']} | error: {r['error']} | | |")
                continue
            base = reference.get("median_ms")
            speed_up = _fmt(base / r["median_ms"] if base else None, "{:.2f}x")
            out.append(f"| {r['impl']} | {r['median_ms']:.1f} | {speed_up} | {r['AP']:.5f} |")
        if all("stats" in r for r in rows):
            worst = max(abs(a - b) for r in rows[1:] for a, b in zip(reference["stats"], r["stats"]))
            out.append(f"\nLargest difference in the 12 stats between backends: {worst:.1e}")
        out.append("")
    for result in results.get("inference", []):
        out += ["### Evaluation of the demo's val images, by component (wall time, median of the passes)", ""]
        out += [f"error: {result['error']}" if "error" in result else inference_table(result), ""]
    for result in results.get("profile", []):
        model = "torchvision's stock RetinaNet of the same architecture" if result.get("impl") == "torchvision" \
            else "detfocal"
        out += [f"### Profile of the training step of {Path(result['config']).name}, batch {result['batch']}, "
                f"{result['repeats']} steps: {model}", ""]
        if "error" in result:
            out.append(f"error: {result['error']}")
        else:
            out += [f"{result['amp'][0].upper()}{result['amp'][1:]}.", "", profile_table(result)]
        out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="detfocal benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats (< 2 min)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of cases")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per case (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed per case")
    parser.add_argument("--coco-sample", type=Path, default=None,
                        help="folder with instances_val2014_100.json and the fake results (eval case)")
    parser.add_argument("--config", type=Path, default=None,
                        help="config whose model, data and optimizer the profile case runs (default: the demo's)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="inference case: a trained checkpoint (default: an untrained demo model)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - set(CASES)
    if unknown:
        raise ValueError(f"--cases: unknown case(s) {sorted(unknown)}; expected {', '.join(CASES)}")
    machine = (f"{cpu_description()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    print(f"detfocal benchmark: {machine}{' (quick)' if args.quick else ''}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {}
    for name, specs in build_specs(args).items():
        results[name] = []
        for spec in specs:
            label = spec.get("impl") or spec.get("backbone", name)
            print(f"  running {name}: {label} {spec.get('head', '')} {spec.get('precision', '')}".rstrip(), flush=True)
            results[name].append(run_case(spec, args.timeout))
    text = report(results)
    print()
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "quick": args.quick, "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
