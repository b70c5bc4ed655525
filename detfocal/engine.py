"""The training loop and its parts: precision choice, optimizer, lr schedule, one epoch, evaluation.

``tools/train.py`` calls these top to bottom; there is no Trainer class and no hook. Every
function takes plain arguments (no config object), so each can be used and tested alone.
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from detfocal.distributed import all_reduce_sum, get_world_size
from detfocal.evaluation import STAT_NAMES


# ----------------------------------------------------------------------------------------------
# Precision


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX-512-BF16 or AMX-BF16).

    Without them bf16 autocast is emulated and slower than fp32, so ``amp: auto`` keeps fp32.
    """
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        capabilities = get_capabilities()
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    try:  # older torch: read the kernel's view of the flags
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool, str]:
    """Pick the autocast dtype and memory format for ``train.amp``.

    ``auto``: fp16 autocast with a GradScaler on CUDA; bf16 autocast plus channels_last on a CPU
    with native bf16 (AVX-512-BF16 or AMX: about 3.8x faster conv training than fp32); fp32
    elsewhere. ``off``, ``bf16`` and ``fp16`` force a choice.

    Args:
        mode: "auto", "off", "bf16" or "fp16".
        device: the training device.

    Returns:
        ``(amp_dtype or None for fp32, channels_last, description)``; the description is one
        line for the log. Use a GradScaler exactly when ``amp_dtype is torch.float16``.

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"train.amp: expected one of 'auto', 'off', 'bf16', 'fp16', got {mode!r}")
    on_cpu = device.type == "cpu"
    native_bf16 = on_cpu and cpu_supports_bf16()
    if mode == "auto":
        if device.type == "cuda":
            mode = "fp16"
        else:
            mode = "bf16" if native_bf16 else "off"
        why = "auto: " + ("CUDA" if device.type == "cuda" else
                          "CPU with AVX-512-BF16/AMX" if native_bf16 else f"{device.type} without native bf16")
    else:
        why = "set by train.amp"
    if mode == "off":
        return None, False, f"precision: fp32 ({why})"
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    # channels_last lets oneDNN pick its blocked bf16 conv kernels; on CUDA it needs tensor-core
    # friendly shapes to help, so it is only turned on for the CPU.
    channels_last = on_cpu
    note = " (emulated: this CPU has no native bf16, expect it slower than fp32)" if on_cpu and mode == "bf16" and not native_bf16 else ""
    scaler = " + GradScaler" if dtype is torch.float16 else ""
    layout = " + channels_last" if channels_last else ""
    return dtype, channels_last, f"precision: {mode} autocast{scaler}{layout} ({why}){note}"


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule


def build_optimizer(model: nn.Module, *, name: str, lr: float, momentum: float = 0.9,
                    weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over the trainable parameters.

    Biases and normalisation weights (every parameter with fewer than 2 dimensions) get no
    weight decay: decaying a GroupNorm scale towards 0 only fights the normalisation.

    Args:
        model: the detector (not DDP-wrapped is fine, the parameters are the same).
        name: "sgd" or "adamw".
        lr: base learning rate.
        momentum: SGD momentum, or AdamW's beta1.
        weight_decay: decay of the weight matrices and conv kernels.

    Returns:
        The optimizer, with two parameter groups (decayed, not decayed).

    Raises:
        ValueError: an unknown ``name``.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise ValueError(f"train.optimizer: expected 'sgd' or 'adamw', got {name!r}")


def lr_factor(iteration: int, *, warmup_iters: int, warmup_factor: float, schedule: str,
              steps: Sequence[int] = (), gamma: float = 0.1, total_iters: int | None = None,
              min_lr_factor: float = 0.0) -> float:
    """The multiplier of the base lr at ``iteration`` (0-based, counted over the whole run).

    Linear warmup from ``warmup_factor`` to 1 over ``warmup_iters`` (Goyal et al. 2017), times
    either a step decay (x ``gamma`` at each of ``steps``, as in the paper's 1x schedule) or a
    cosine from 1 to ``min_lr_factor`` over ``total_iters``.

    Raises:
        ValueError: an unknown schedule, or cosine without ``total_iters``.
    """
    warmup = 1.0
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        warmup = warmup_factor * (1 - alpha) + alpha
    if schedule == "step":
        return warmup * gamma ** sum(iteration >= step for step in steps)
    if schedule == "cosine":
        if not total_iters:
            raise ValueError("train.schedule: cosine needs the total number of iterations")
        progress = min(iteration / total_iters, 1.0)
        return warmup * (min_lr_factor + (1 - min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"train.schedule.type: expected 'step' or 'cosine', got {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_iters: int, warmup_factor: float,
                    schedule: str, steps: Sequence[int] = (), gamma: float = 0.1,
                    total_iters: int | None = None, min_lr_factor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration ``LambdaLR`` following ``lr_factor``; call ``step()`` after every optimizer step.

    Its ``last_epoch`` is the number of iterations done, which ``train_one_epoch`` uses as the
    global step. The lambda is a closure, so ``state_dict()`` stays plain data.
    """
    lr_factor(0, warmup_iters=warmup_iters, warmup_factor=warmup_factor, schedule=schedule, steps=steps,
              gamma=gamma, total_iters=total_iters, min_lr_factor=min_lr_factor)  # validate now, not mid-run
    steps = tuple(steps)

    def factor(iteration: int) -> float:
        return lr_factor(iteration, warmup_iters=warmup_iters, warmup_factor=warmup_factor, schedule=schedule,
                         steps=steps, gamma=gamma, total_iters=total_iters, min_lr_factor=min_lr_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------
# Training and evaluation


def _to_device(images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, Any]], device: torch.device) -> tuple[list, list]:
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets


def _mean_over_ranks(loss_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The losses (and their total) averaged over processes, as Python floats, for logging."""
    names = list(loss_dict)
    values = torch.stack([loss_dict[name].detach().float() for name in names])
    values = torch.cat([values, values.sum().reshape(1)])
    values = all_reduce_sum(values) / get_world_size()
    return dict(zip(names + ["loss"], values.tolist()))


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    loader: Iterable, device: torch.device, epoch: int, *,
                    scaler: torch.amp.GradScaler | None = None, amp_dtype: torch.dtype | None = None,
                    grad_clip: float | None = None, log_interval: int = 20,
                    metrics_writer: Callable[[dict[str, Any]], None] | None = None, is_main: bool = True,
                    max_iters: int | None = None) -> dict[str, float]:
    """Train for one pass over ``loader`` (or until ``max_iters`` iterations in all).

    The global step is ``scheduler.last_epoch`` (iterations since the start of the run), so a
    resumed run continues the count. A step is logged (progress bar and ``metrics_writer``) at
    the first iteration of the epoch and every ``log_interval`` steps; logged losses are averaged
    over processes.

    Args:
        model: the detector in train mode returns ``{"classification", "bbox_regression"}``;
            DDP-wrapped under torchrun.
        optimizer, scheduler: from ``build_optimizer`` / ``build_scheduler``.
        loader: yields ``(images, targets)`` lists (``collate_fn``).
        device: where the batch goes.
        epoch: 0-based epoch number, for the logs.
        scaler: a GradScaler for fp16, else None.
        amp_dtype: the autocast dtype, or None for fp32.
        grad_clip: max total gradient norm, or None.
        log_interval: steps between logged lines.
        metrics_writer: called with each logged record (a JSON-able dict); None on other ranks.
        is_main: show the progress bar (rank 0 only).
        max_iters: stop once the global step reaches it.

    Returns:
        ``{"loss", "classification", "bbox_regression": epoch means, "iters": steps done this
        epoch, "global_step", "images_per_s", "seconds"}``.

    Raises:
        FloatingPointError: a loss is not finite. Its message is one line with the losses; the
            optimizer has not stepped on that batch, so the last checkpoint stays the last good one.
    """
    model.train()
    world_size = get_world_size()
    sums: dict[str, float] = defaultdict(float)
    iters = images_seen = 0
    start = time.perf_counter()
    progress = tqdm(loader, desc=f"epoch {epoch}", disable=not is_main, dynamic_ncols=True, leave=False)
    for images, targets in progress:
        if max_iters is not None and scheduler.last_epoch >= max_iters:
            break
        images, targets = _to_device(images, targets, device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        logged = _mean_over_ranks(loss_dict)  # synchronises, so every rank sees the same verdict
        if not all(math.isfinite(value) for value in logged.values()):
            losses = ", ".join(f"{name}={value:.6g}" for name, value in logged.items())
            raise FloatingPointError(f"non-finite loss at epoch {epoch}, step {scheduler.last_epoch + 1}: {losses}")

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]  # the lr this step used
        scheduler.step()

        iters += 1
        images_seen += len(images) * world_size
        for name, value in logged.items():
            sums[name] += value
        step = scheduler.last_epoch
        if iters == 1 or step % log_interval == 0:
            images_per_s = images_seen / max(time.perf_counter() - start, 1e-9)
            record = {"type": "train", "epoch": epoch, "step": step, "lr": lr, **logged, "images_per_s": images_per_s}
            if metrics_writer is not None:
                metrics_writer(record)
            progress.set_postfix({**{k.split("_")[0][:5]: f"{v:.3f}" for k, v in logged.items()},
                                  "lr": f"{lr:.2e}", "img/s": f"{images_per_s:.1f}"}, refresh=False)
    progress.close()
    elapsed = time.perf_counter() - start
    means = {name: total / max(iters, 1) for name, total in sums.items()}
    return {**means, "iters": iters, "global_step": scheduler.last_epoch,
            "images_per_s": images_seen / max(elapsed, 1e-9), "seconds": elapsed}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, evaluator: Any, device: torch.device,
             amp_dtype: torch.dtype | None = None, *, is_main: bool = True) -> dict[str, Any]:
    """Run the detector over ``loader``, gather predictions across processes and summarize.

    Args:
        model: the detector, not DDP-wrapped (inference needs no gradient sync).
        loader: yields ``(images, targets)``; each rank sees its own share of the images.
        evaluator: a ``CocoEvaluator`` (``update``, ``synchronize``, ``summarize``).
        device: where the images go.
        amp_dtype: autocast dtype for the forward pass, or None.
        is_main: rank 0 summarizes and shows the progress bar.

    Returns:
        On the main process, ``evaluator.summarize()``: the 12 COCO stats and ``per_class``;
        ``{}`` on the other ranks.
    """
    was_training = model.training
    model.eval()
    for images, targets in tqdm(loader, desc="eval", disable=not is_main, dynamic_ncols=True, leave=False):
        images = [image.to(device, non_blocking=True) for image in images]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(images)
        evaluator.update({target["image_id"]: {k: v.float().cpu() for k, v in output.items()}
                          for target, output in zip(targets, outputs)})
    evaluator.synchronize()  # a collective: every rank must reach it
    model.train(was_training)
    return evaluator.summarize() if is_main else {}


# ----------------------------------------------------------------------------------------------
# metrics.jsonl and its plots


def append_metrics(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line (with a wall-clock ``time``) to ``path``."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_training_curves(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write ``loss.png`` (train losses by step) and, if any evaluation ran, ``ap.png`` (AP by epoch).

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    written = []
    steps = [r for r in records if r.get("type") == "train"]
    if steps:
        figure, axes = plt.subplots(figsize=(7, 4))
        for name in ("loss", "classification", "bbox_regression"):
            axes.plot([r["step"] for r in steps], [r[name] for r in steps], label=name)
        axes.set_xlabel("iteration")
        axes.set_ylabel("loss")
        axes.set_yscale("log")
        axes.legend()
        figure.tight_layout()
        figure.savefig(out_dir / "loss.png")
        plt.close(figure)
        written.append(out_dir / "loss.png")
    evaluations = [r for r in records if r.get("type") == "epoch" and "AP" in r]
    if evaluations:
        figure, axes = plt.subplots(figsize=(7, 4))
        for name in ("AP", "AP50", "AP75"):
            axes.plot([r["epoch"] + 1 for r in evaluations], [r[name] for r in evaluations], marker="o", label=name)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        axes.set_ylabel("COCO box AP (val)")
        axes.set_ylim(0, 1)
        axes.legend()
        figure.tight_layout()
        figure.savefig(out_dir / "ap.png")
        plt.close(figure)
        written.append(out_dir / "ap.png")
    return written


# pycocotools' summary lines, in the order of STAT_NAMES: (AP or AR, IoU range, area, max detections).
_COCO_ROWS = [("Precision", "(AP)", "0.50:0.95", "all", 100), ("Precision", "(AP)", "0.50", "all", 100),
              ("Precision", "(AP)", "0.75", "all", 100), ("Precision", "(AP)", "0.50:0.95", "small", 100),
              ("Precision", "(AP)", "0.50:0.95", "medium", 100), ("Precision", "(AP)", "0.50:0.95", "large", 100),
              ("Recall", "(AR)", "0.50:0.95", "all", 1), ("Recall", "(AR)", "0.50:0.95", "all", 10),
              ("Recall", "(AR)", "0.50:0.95", "all", 100), ("Recall", "(AR)", "0.50:0.95", "small", 100),
              ("Recall", "(AR)", "0.50:0.95", "medium", 100), ("Recall", "(AR)", "0.50:0.95", "large", 100)]


def format_summary(summary: Mapping[str, Any], columns: int = 4) -> str:
    """The COCO table as pycocotools prints it, then the per-class AP in ``columns`` columns.

    -1 means the ground truth has no box of that kind (pycocotools' convention).
    """
    lines = [f" {'Average ' + kind:<18} {short} @[ IoU={iou:<9} | area={area:>6s} | maxDets={dets:>3d} ] = "
             f"{summary.get(name, float('nan')):0.3f}"
             for name, (kind, short, iou, area, dets) in zip(STAT_NAMES, _COCO_ROWS)]
    per_class = list(summary.get("per_class", {}).items())
    if per_class:
        width = max(len(name) for name, _ in per_class)
        lines.append("per-class AP (IoU 0.50:0.95, -1: no ground truth):")
        cells = [f"{name:<{width}} {ap:6.3f}" for name, ap in per_class]
        lines += ["  " + "   ".join(cells[i:i + columns]) for i in range(0, len(cells), columns)]
    return "\n".join(lines)
