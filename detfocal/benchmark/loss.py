"""The loss and scaling cases: focal loss forward+backward at COCO scale against torchvision."""
from __future__ import annotations

import math
import os
from typing import Any

from .timing import fmt, time_call

FEATURE_STRIDES = (8, 16, 32, 64, 128)
DTYPES = ("fp32", "fp16", "bf16")
GRAD_SCALER_SCALE = 2.0 ** 16  # GradScaler's initial scale: fp16 rows backpropagate a scaled loss, as in training


def coco_num_anchors(height: int = 800, width: int = 1333, anchors_per_location: int = 9) -> int:
    """Anchors torchvision's RetinaNet makes for one image (padded to a multiple of 32)."""
    height, width = (math.ceil(s / 32) * 32 for s in (height, width))
    return anchors_per_location * sum(math.ceil(height / s) * math.ceil(width / s) for s in FEATURE_STRIDES)


def loss_inputs(batch: int, num_anchors: int, num_classes: int, device: str, seed: int = 0) -> dict[str, Any]:
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


def loss_case(spec: dict[str, Any]) -> dict[str, Any]:
    """One loss row: forward + backward of ``spec["impl"]`` on logits of ``spec["dtype"]`` (fp32, fp16, bf16;
    an ``_fp16`` suffix of the impl means fp16); fp16 losses are multiplied by GradScaler's scale first."""
    import torch
    import torchvision

    device = spec["device"]
    inputs = loss_inputs(spec["batch"], spec["num_anchors"], spec["num_classes"], device)
    impl = spec["impl"]
    dtype = spec.get("dtype") or ("fp16" if impl.endswith("_fp16") else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    base = inputs["logits"].to({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
    scale = GRAD_SCALER_SCALE if dtype == "fp16" else 1.0
    logits = base.clone().requires_grad_(True)

    def backward(loss: Any) -> None:
        (loss * scale if scale != 1.0 else loss).backward()

    if impl in ("detfocal_compiled", "detfocal_eager"):
        os.environ["DETFOCAL_COMPILE"] = "1" if impl == "detfocal_compiled" else "0"
        from detfocal.losses import sigmoid_focal_loss

        labels = inputs["labels"]

        def step() -> None:
            logits.grad = None
            num_foreground = (labels >= 0).logical_and(labels < base.shape[-1]).sum().clamp(min=1)
            backward(sigmoid_focal_loss(logits, labels, 0.25, 2.0, "sum", normalizer=num_foreground))
    elif impl in ("detfocal_head", "detfocal_head_fp16"):
        os.environ["DETFOCAL_COMPILE"] = spec.get("compile", "auto")
        from detfocal.modeling.heads import FocalClassificationHead

        head = FocalClassificationHead(8, 9, base.shape[-1]).to(device)

        def step() -> None:
            logits.grad = None
            backward(head.compute_loss(inputs["targets"], {"cls_logits": logits}, inputs["matched_idxs"]))
    elif impl == "torchvision_head":
        from torchvision.models.detection.retinanet import RetinaNetClassificationHead

        head = RetinaNetClassificationHead(8, 9, base.shape[-1]).to(device)

        def step() -> None:
            logits.grad = None
            backward(head.compute_loss(inputs["targets"], {"cls_logits": logits}, inputs["matched_idxs"]))
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
            backward(loss_fn(logits, one_hot, 0.25, 2.0, "sum"))
    elif impl == "sigmoid_pass":
        def step() -> None:
            torch.sigmoid(base)
    else:
        raise ValueError(f"unknown impl {impl!r}")
    first, median_ms, extra_mb = time_call(step, spec["repeats"], device)
    result = {"first_call_s": first, "median_ms": median_ms, "peak_extra_mb": extra_mb,
              "logits_mb": base.numel() * base.element_size() / 2**20, "dtype": dtype}
    if impl.startswith("detfocal"):
        from detfocal.losses import backend

        result["backend"] = backend()
    return result


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
            f"| {r['impl']} | {ms:.1f} | {fmt(tv / ms if tv else None, '{:.1f}x')} | "
            f"{fmt(ms / sig if sig else None, '{:.2f}x')} | {r['peak_extra_mb']:.0f} | "
            f"{r['peak_extra_mb'] / r['logits_mb']:.2f} |")
    return "\n".join(lines)


def fit_exponent(rows: list[dict[str, Any]]) -> float:
    """Least-squares slope of log(time) against log(N*C)."""
    points = [(math.log(r["num_anchors"] * r["num_classes"] * r["batch"]), math.log(r["median_ms"]))
              for r in rows if "error" not in r]
    if len(points) < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
