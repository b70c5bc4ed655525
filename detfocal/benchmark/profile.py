"""The profile case: the demo's training step under torch.profiler, split by component."""
from __future__ import annotations

import os
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from .timing import around_method, around_module
from .training import torchvision_twin

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
    """Open a record_function range named ``label`` around every forward of ``module``."""
    from torch.profiler import record_function

    around_module(module, partial(record_function, label))


def _label_method(owner: Any, name: str, label: str) -> None:
    """Run ``owner.name`` inside a range ``label`` (torchvision's head has no labels_for_loss: skipped)."""
    from torch.profiler import record_function

    around_method(owner, name, partial(record_function, label))


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


def profile_case(spec: dict[str, Any]) -> dict[str, Any]:
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from detfocal.config import load_config, model_kwargs, optimizer_kwargs, transform_kwargs
    from detfocal.data import CocoDetection, build_transforms, collate_fn, shapes
    from detfocal.engine.optim import build_optimizer
    from detfocal.engine.precision import resolve_amp
    from detfocal.engine.train import train_step
    from detfocal.utils.registry import DETECTORS

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
