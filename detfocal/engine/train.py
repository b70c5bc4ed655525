"""The training loop: ``detfocal.train(config)``.

It reads top to bottom, like detectron2's ``plain_train_net.py`` and with no hooks: output
folder -> data -> model, precision, optimizer -> resume -> one loop over the global
iteration (train step, log, evaluate and checkpoint at epoch ends) -> plots and summary.
One counter, ``iteration``, drives the lr schedule, ``max_iters``, logging, evaluation and
mid-epoch resume.

Example:
    >>> import detfocal
    >>> summary = detfocal.train("configs/shapes_retinanet_r18.yaml", "runs/demo")
    >>> summary["best_ap"]
"""
from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from detfocal.config import (config_from_dict, config_to_dict, config_to_yaml, data_paths, dataset_kwargs, load_config,
                             model_kwargs, optimizer_kwargs, scheduler_kwargs, transform_kwargs)
from detfocal.data import CocoDetection, build_transforms, collate_fn
from detfocal.engine.checkpoint import (capture_rng_state, check_compatible, load_checkpoint, load_detector_weights,
                                        restore_rng_state, save_checkpoint)
from detfocal.utils.comm import all_reduce_sum, cleanup, init_distributed, is_dist_initialized
from detfocal.engine.inference import draw_detections, evaluate
from detfocal.engine.logging import append_metrics, format_summary, log_scalars, open_tensorboard, read_metrics
from detfocal.engine.optim import build_ema, build_lr_schedule, build_optimizer, set_lr
from detfocal.engine.precision import resolve_amp
from detfocal.engine.workers import resolve_workers
from detfocal.evaluation.coco import STAT_NAMES, CocoEvaluator
from detfocal.utils.io import atomic_write, ensure_writable_dir, remove_stale_temporaries, write_json_atomic
from detfocal.utils.registry import DETECTORS

__all__ = ["RUN_FILES", "prepare_output_dir", "train", "train_step"]

# What a run writes into its folder; --overwrite removes exactly these, nothing else.
RUN_FILES = ("metrics.jsonl", "metrics.json", "config.yaml", "last.pth", "best.pth", "interrupted.pth", "results.json",
             "loss.png", "ap.png", "pr_curves.png", "per_class_ap.png", "per_class.csv")
NUM_TENSORBOARD_IMAGES = 4  # val images drawn with their detections at each evaluation


# ----------------------------------------------------------------------------------------------
# The run folder


def _describe_run(out_dir: Path) -> str:
    """"epoch 4, best AP 0.57" from a run's metrics.jsonl (the checkpoints are not read)."""
    try:
        epochs = [r for r in read_metrics(out_dir / "metrics.jsonl") if r.get("type") == "epoch"]
    except (OSError, ValueError):
        return "files " + ", ".join(name for name in RUN_FILES if (out_dir / name).exists())
    if not epochs:
        return "no finished epoch"
    best = max((r["AP"] for r in epochs if "AP" in r), default=None)
    return f"epoch {epochs[-1]['epoch'] + 1}" + (f", best AP {best:.2f}" if best is not None else "")


def prepare_output_dir(out_dir: Path, *, resuming: bool, overwrite: bool) -> list[Path]:
    """Check the run folder before any work: it must be a writable folder holding no other run.

    Nothing a user trained is replaced without ``overwrite``: a folder that holds a run is
    refused unless the run is resumed. Temporaries of an interrupted checkpoint write are
    removed.

    Returns:
        The stale temporaries removed.

    Raises:
        ValueError: the folder holds a run (and neither ``resuming`` nor ``overwrite``), is a
            file, or cannot be created or written.
    """
    existing = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not resuming:
        if not overwrite:
            raise ValueError(f"{out_dir} holds a run ({_describe_run(out_dir)}); use --resume to continue it, "
                             f"--output-dir for a new folder, or --overwrite to replace it")
        for path in existing:
            path.unlink()
        for events in (out_dir / "tensorboard").glob("events.out.tfevents.*"):
            events.unlink()
    ensure_writable_dir(out_dir, "--output-dir")
    return remove_stale_temporaries(out_dir)


# ----------------------------------------------------------------------------------------------
# One step


class StopRequest:
    """Ctrl-C (SIGINT) sets a flag that the loop reads at the next step boundary.

    Stopping between steps means the saved ``interrupted.pth`` is consistent (never a
    half-applied optimizer step) and resumes exactly. A second Ctrl-C stops at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to stop now)", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _first_nonfinite_parameter(model: nn.Module) -> str:
    for name, parameter in model.named_parameters():
        if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
            return name.removeprefix("module.")
    return "<none found>"


def train_step(model: nn.Module, images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, Any]],
               optimizer: torch.optim.Optimizer, *, amp_dtype: torch.dtype | None,
               scaler: torch.amp.GradScaler | None, grad_clip: float | None,
               stop_requested: Callable[[], bool] = lambda: False, iteration: int = 0) -> dict[str, float]:
    """One forward, backward and (unless skipped) optimizer step, with one host sync.

    The losses, the gradient norm and the stop flag travel in a single all-reduce, which is
    also the step's only host sync: every rank sees the same verdict. The gradient norm is
    computed after unscaling (fp16) and reused for clipping.

    Returns:
        The losses averaged over processes (``classification``, ``bbox_regression``, ``loss``),
        ``grad_norm``, ``skipped`` (1.0 when the GradScaler skipped the step, fp16 only) and
        ``stop`` (1.0 when ``stop_requested()`` was true on any rank at the sync).

    Raises:
        FloatingPointError: a non-finite loss, or (fp32/bf16) a non-finite gradient, naming the
            first such parameter and the step; the optimizer has not stepped.
    """
    device_type = images[0].device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss_dict = model(images, targets)
    loss = sum(loss_dict.values())
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)  # the norm and the clipping see the true gradients
    parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = (torch.nn.utils.get_total_norm([p.grad for p in parameters], foreach=True) if parameters
                 else torch.zeros((), device=loss.device))

    names = list(loss_dict)
    world_size = torch.distributed.get_world_size() if is_dist_initialized() else 1
    values = torch.stack([loss_dict[name].detach().float() for name in names] +
                         [loss.detach().float(), grad_norm.float(),
                          torch.tensor(float(stop_requested()), device=loss.device)])
    # Means over ranks; the gradient norm is the same on every rank, and stop > 0 if any rank stops.
    values = (all_reduce_sum(values) / world_size).tolist()  # the step's one host sync
    logged = dict(zip(names + ["loss", "grad_norm", "stop"], values))
    if not all(math.isfinite(logged[name]) for name in names + ["loss"]):
        losses = ", ".join(f"{name}={logged[name]:.6g}" for name in names + ["loss"])
        raise FloatingPointError(f"non-finite loss at step {iteration + 1}: {losses}")
    finite_grads = math.isfinite(logged["grad_norm"])
    if not finite_grads and scaler is None:
        raise FloatingPointError(f"non-finite gradient at step {iteration + 1} in parameter "
                                 f"{_first_nonfinite_parameter(model)} (loss {logged['loss']:.6g}); no step was taken")
    if grad_clip is not None and finite_grads:
        torch.nn.utils.clip_grads_with_norm_(parameters, grad_clip, grad_norm, foreach=True)
    if scaler is not None:
        scaler.step(optimizer)  # skips the step itself when unscale_ found inf/NaN
        scaler.update()
    else:
        optimizer.step()
    logged["skipped"] = float(not finite_grads)
    return logged


# ----------------------------------------------------------------------------------------------
# The run


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``, to name the keys that differ."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _seed_worker(worker_id: int) -> None:
    """DataLoader workers: derive Python's and NumPy's seeds from the per-worker torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _find_resume_checkpoint(out_dir: Path, resume: str | Path | bool) -> Path:
    """``resume=True`` (or ""): the newer of OUT/interrupted.pth and OUT/last.pth."""
    if resume not in (True, ""):
        return Path(resume)  # type: ignore[arg-type]
    candidates = [path for path in (out_dir / "interrupted.pth", out_dir / "last.pth") if path.is_file()]
    if not candidates:
        raise FileNotFoundError(f"--resume: {out_dir} has no last.pth or interrupted.pth to continue from")
    return max(candidates, key=lambda path: path.stat().st_mtime_ns)


def train(config: str | Path | Any, output_dir: str | Path | None = None, resume: str | Path | bool | None = None,
          *, overrides: Sequence[str] = (), overwrite: bool = False) -> dict[str, Any]:
    """Train a detector as the config says; the function behind ``detfocal train``.

    Under torchrun every process calls it; rank 0 writes the files. It writes to
    ``output_dir``: metrics.jsonl (one JSON line per logged step and per epoch), config.yaml,
    last.pth and best.pth (by val AP) at epoch ends, interrupted.pth on Ctrl-C (at a step
    boundary, resumable mid-epoch), results.json, metrics.json and the plots.

    Args:
        config: a YAML path or a loaded config (``detfocal.config.load_config``).
        output_dir: the run folder; default ``runs/<config file name>``.
        resume: a checkpoint to continue from, or True for the newer of OUT/interrupted.pth and
            OUT/last.pth; None starts a new run.
        overrides: ``key=value`` strings applied to the config (``--set``).
        overwrite: replace the run already in ``output_dir`` (its files only).

    Returns:
        ``{"output_dir", "iterations", "best_ap", "stopped", "skipped_steps", "bad_images",
        "minutes"}`` plus the last evaluation's COCO stats and ``per_class`` (rank 0; other
        ranks get the same keys without the stats).

    Raises:
        ValueError, FileNotFoundError: bad config, data, output folder or checkpoint.
        FloatingPointError: a non-finite loss or (fp32/bf16) gradient; last.pth is untouched.
        KeyboardInterrupt: after Ctrl-C, once interrupted.pth is written.
    """
    if isinstance(config, (str, Path)):
        cfg = load_config(config, overrides)
        default_dir = Path("runs") / Path(config).stem
    else:
        cfg = config_from_dict(config_to_dict(config), overrides) if overrides else config
        default_dir = Path("runs") / "run"
    out_dir = Path(output_dir) if output_dir is not None else default_dir
    owns_process_group = not is_dist_initialized()
    rank, local_rank, world_size, device = init_distributed()
    try:
        return _train(cfg, out_dir, resume, overwrite, rank, local_rank, world_size, device)
    finally:
        if owns_process_group:
            cleanup()


def _train(cfg: Any, out_dir: Path, resume: str | Path | bool | None, overwrite: bool, rank: int, local_rank: int,
           world_size: int, device: torch.device) -> dict[str, Any]:
    is_main = rank == 0
    # ---- the run folder and the checkpoint, checked before any data or model work
    checkpoint, checkpoint_path = None, None
    if resume is not None and resume is not False:
        checkpoint_path = _find_resume_checkpoint(out_dir, resume)
        checkpoint = load_checkpoint(checkpoint_path)
    if is_main:
        removed = prepare_output_dir(out_dir, resuming=checkpoint is not None, overwrite=overwrite)
        if removed:
            print(f"removed {len(removed)} temporary file(s) of an interrupted checkpoint write in {out_dir}")

    seed = cfg.train.seed
    # Each rank its own augmentation stream; DDP copies rank 0's initial weights to the others.
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    # ---- data. Rank 0 generates the shapes data (if configured and missing); the others wait.
    paths = data_paths(cfg.data, generate=is_main)
    if world_size > 1:
        torch.distributed.barrier()
    (train_images, train_annotations), (val_images, val_annotations) = paths["train"], paths["val"]
    skip_bad = cfg.data.skip_bad_images
    train_set = CocoDetection(**dataset_kwargs(cfg, train_images, train_annotations), skip_bad_images=skip_bad,
                              transforms=build_transforms(train=True, **transform_kwargs(cfg)))
    val_set = CocoDetection(**dataset_kwargs(cfg, val_images, val_annotations), skip_bad_images=skip_bad,
                            transforms=build_transforms(train=False))
    if val_set.label_to_category_id != train_set.label_to_category_id:
        raise ValueError(f"data.val.annotations: categories {val_set.label_to_category_id} differ from the training "
                         f"set's {train_set.label_to_category_id}; use the same category list or data.subset.categories")
    num_classes = cfg.model.num_classes or train_set.num_classes
    if num_classes != train_set.num_classes:
        raise ValueError(f"model.num_classes: {num_classes}, but {train_annotations} has {train_set.num_classes} "
                         f"categories (after data.subset); leave it null to take theirs")
    if checkpoint is not None:
        check_compatible(checkpoint, cfg, num_classes, source=str(checkpoint_path))

    # The shuffling is a function of (seed, epoch) only, also in one process.
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    batch_size = cfg.train.batch_size
    iters_per_epoch = math.ceil(len(sampler) / batch_size)
    loader_generator = torch.Generator()

    def epoch_loader(epoch: int, skip_batches: int) -> DataLoader:
        """This epoch's batches, from batch ``skip_batches`` on (mid-epoch resume reads no skipped image)."""
        sampler.set_epoch(epoch)
        loader_generator.manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)  # worker seeds
        indices = list(sampler)[skip_batches * batch_size:]
        return DataLoader(train_set, batch_size=batch_size, sampler=indices, num_workers=workers,
                          collate_fn=collate_fn, worker_init_fn=_seed_worker, generator=loader_generator)

    # ---- model, precision, optimizer, schedule
    model = DETECTORS.get(cfg.model.type)(**model_kwargs(cfg, num_classes)).to(device)
    amp_dtype, channels_last, amp_note = resolve_amp(cfg.train.amp, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Before any weights are loaded or wrapped: the measurement leaves model and RNGs as they were.
    workers, workers_note = resolve_workers(cfg.data.workers, train_set, batch_size, collate_fn, model, device,
                                            amp_dtype=amp_dtype, deterministic=cfg.train.deterministic,
                                            # Without torchrun's LOCAL_WORLD_SIZE, assume every process shares this node.
                                            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    # Each rank evaluates every world_size-th image, with no padding repeats; its own generator
    # keeps evaluation from drawing on the global RNG, so evaluating does not change training.
    val_loader = DataLoader(val_set, batch_size=cfg.eval.batch_size, sampler=list(range(rank, len(val_set), world_size)),
                            num_workers=workers, collate_fn=collate_fn, generator=torch.Generator())
    model_without_ddp = model
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    total_iters = cfg.train.epochs * iters_per_epoch
    if cfg.train.max_iters is not None:
        total_iters = min(total_iters, cfg.train.max_iters)
    optimizer = build_optimizer(model_without_ddp, **optimizer_kwargs(cfg))
    lr_schedule = build_lr_schedule(**scheduler_kwargs(cfg), total_iters=total_iters)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None
    if cfg.model.weights is not None and checkpoint is None:  # fine-tuning: before the EMA copies the model
        weights_note = load_detector_weights(model_without_ddp, cfg.model.weights)
        if is_main:
            print(weights_note)
    ema = None if cfg.train.ema is None else build_ema(model_without_ddp, decay=cfg.train.ema.decay,
                                                      warmup_iters=cfg.train.ema.warmup_iters)

    iteration, best_ap, skipped_steps, evaluations_since_best = 0, -1.0, 0, 0
    if checkpoint is not None:
        model_without_ddp.load_state_dict(checkpoint["model"])
        previous = checkpoint.get("config", {}).get("train", {}).get("optimizer", cfg.train.optimizer)
        if previous != cfg.train.optimizer:
            raise ValueError(f"train.optimizer: the checkpoint's optimizer state is {previous!r}, cannot resume "
                             f"it as {cfg.train.optimizer!r}")
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None and checkpoint.get("ema") is not None:
            ema.module.load_state_dict(checkpoint["ema"])
            ema.n_averaged.fill_(int(checkpoint["ema_updates"]))
        iteration = int(checkpoint.get("iteration", checkpoint.get("global_step", 0)))
        best_ap, skipped_steps = checkpoint["best_ap"], int(checkpoint.get("skipped_steps", 0))
        evaluations_since_best = int(checkpoint.get("evaluations_since_best", 0))
        if is_main:  # only rank 0's streams are saved; the other ranks keep their fresh seeds
            restore_rng_state(checkpoint["rng"])
            before, now = _flatten(checkpoint.get("config", {})), _flatten(config_to_dict(cfg))
            changed = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
            if changed:
                print(f"note: resuming with {len(changed)} config values changed ({', '.join(changed[:8])}); "
                      f"the optimizer state (momentum) still comes from the checkpoint")

    if is_main:
        print(amp_note)
        if workers_note:
            print(workers_note)
        print(f"data: {len(train_set)} train / {len(val_set)} val images, {num_classes} classes; batch {batch_size} x "
              f"{world_size} process(es); {iters_per_epoch} iterations per epoch, {total_iters} in all")
        if checkpoint is not None:
            print(f"resumed from {checkpoint_path} at step {iteration} (epoch {iteration / iters_per_epoch:.2f}), "
                  f"best AP {best_ap:.4f}")
        print(f"output: {out_dir}")
        atomic_write(out_dir / "config.yaml", lambda handle: handle.write(config_to_yaml(cfg)), binary=False)

    def state() -> dict[str, Any]:
        """Everything needed to continue, as plain data (torch.load(weights_only=True) reads it)."""
        return {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "iteration": iteration,
                "epoch": iteration // iters_per_epoch, "rng": capture_rng_state(), "best_ap": best_ap,
                "skipped_steps": skipped_steps, "evaluations_since_best": evaluations_since_best,
                "ema": None if ema is None else ema.module.state_dict(),
                "ema_updates": 0 if ema is None else int(ema.n_averaged), "config": config_to_dict(cfg),
                "num_classes": num_classes,
                "label_to_category_id": list(train_set.label_to_category_id),
                "category_names": list(train_set.category_names)}

    # ---- the loop, by global iteration
    write_metrics: Callable[[dict[str, Any]], None] = (
        (lambda record: append_metrics(out_dir / "metrics.jsonl", record)) if is_main else (lambda record: None))
    interactive = is_main and sys.stderr.isatty()  # a bar in a terminal, plain lines in logs
    writer = open_tensorboard(out_dir, cfg.train.tensorboard) if is_main else None
    eval_model = model_without_ddp if ema is None else ema.module  # evaluation and best.pth use the EMA
    log_interval = cfg.train.log_interval
    summary: dict[str, Any] = {}
    evaluator = None
    stopped = "completed" if cfg.train.max_iters is None or total_iters < cfg.train.max_iters else "max_iters"
    start_time = time.perf_counter()
    model.train()
    with StopRequest() as stop:
        while iteration < total_iters:
            epoch, offset = divmod(iteration, iters_per_epoch)
            epoch_end = min((epoch + 1) * iters_per_epoch, total_iters)
            sums: dict[str, float] = defaultdict(float)
            steps = images_seen = 0
            epoch_start = time.perf_counter()
            progress = tqdm(total=epoch_end - iteration, desc=f"epoch {epoch}", disable=not interactive,
                            dynamic_ncols=True, leave=False)
            for images, targets in epoch_loader(epoch, offset):
                images = [image.to(device, non_blocking=True) for image in images]
                targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                           for t in targets]
                lr = cfg.train.lr * lr_schedule(iteration)
                set_lr(optimizer, lr)
                try:
                    logged = train_step(model, images, targets, optimizer, amp_dtype=amp_dtype, scaler=scaler,
                                        grad_clip=cfg.train.grad_clip, stop_requested=lambda: stop.requested,
                                        iteration=iteration)
                except FloatingPointError:
                    progress.close()
                    raise
                iteration += 1
                steps += 1
                images_seen += len(images) * world_size
                skipped_steps += int(logged["skipped"])
                if ema is not None and not logged["skipped"]:
                    ema.update_parameters(model_without_ddp)
                for name in ("classification", "bbox_regression", "loss"):
                    sums[name] += logged.get(name, 0.0)
                progress.update()
                if steps == 1 or iteration % log_interval == 0 or iteration == epoch_end:
                    images_per_s = images_seen / max(time.perf_counter() - epoch_start, 1e-9)
                    record = {"type": "train", "epoch": epoch, "step": iteration, "lr": lr,
                              **{k: v for k, v in logged.items() if k not in ("stop", "skipped")},
                              "skipped_steps": skipped_steps, "images_per_s": images_per_s}
                    write_metrics(record)
                    log_scalars(writer, "train", {k: v for k, v in record.items() if k not in ("epoch", "step")},
                                iteration)
                    progress.set_postfix({"loss": f"{logged['loss']:.3f}", "lr": f"{lr:.2e}",
                                          "img/s": f"{images_per_s:.1f}"}, refresh=False)
                    if is_main and not interactive:
                        print(f"epoch {epoch} step {iteration}/{total_iters}: loss {logged['loss']:.4f} (cls "
                              f"{logged.get('classification', float('nan')):.4f}, box "
                              f"{logged.get('bbox_regression', float('nan')):.4f}), lr {lr:.2e}, "
                              f"{images_per_s:.1f} img/s", flush=True)
                if logged["stop"] > 0 and iteration != epoch_end:  # at an epoch end, last.pth below serves
                    progress.close()
                    if is_main:
                        path = save_checkpoint(out_dir / "interrupted.pth", state())
                        print(f"interrupted: saved {path} at step {iteration}; resume with --resume", file=sys.stderr)
                    raise KeyboardInterrupt
                if iteration == epoch_end:
                    break
            progress.close()

            # ---- epoch end: evaluate when due, checkpoint
            finished = iteration == total_iters
            seconds = time.perf_counter() - epoch_start
            record = {"type": "epoch", "epoch": epoch, "step": iteration, "lr": lr, "seconds": seconds,
                      "images_per_s": images_seen / max(seconds, 1e-9), "skipped_steps": skipped_steps,
                      **{name: total / max(steps, 1) for name, total in sums.items()}}
            evaluated = (epoch + 1) % cfg.eval.interval == 0 or finished
            if evaluated:
                # fp32 inference, as torchvision's references: 16-bit box regression loses whole pixels.
                evaluator = CocoEvaluator(val_set.coco, val_set.label_to_category_id, backend=cfg.eval.backend)
                summary = evaluate(eval_model, val_loader, evaluator, device, is_main=is_main, progress=interactive)
                model.train()
                record.update({name: summary[name] for name in STAT_NAMES if name in summary})
                if is_main and writer is not None:
                    _log_evaluation(writer, eval_model, val_set, evaluator, summary, iteration, device)
            if is_main:
                write_metrics(record)
                line = f"epoch {epoch}: loss {record.get('loss', float('nan')):.4f}, {record['images_per_s']:.1f} img/s"
                if "AP" in record:
                    line += f", val AP {record['AP']:.4f} AP50 {record['AP50']:.4f}"
                    if record["AP"] > best_ap:
                        best_ap, evaluations_since_best = record["AP"], 0
                        save_checkpoint(out_dir / "best.pth", state())
                    else:
                        evaluations_since_best += 1
                if skipped_steps:
                    line += f", {skipped_steps} steps skipped by the fp16 GradScaler so far"
                print(line, flush=True)
                save_checkpoint(out_dir / "last.pth", state())
                (out_dir / "interrupted.pth").unlink(missing_ok=True)  # last.pth is newer now
            if logged["stop"] > 0:
                if is_main:
                    print(f"interrupted: stopped at the end of epoch {epoch}; resume with --resume", file=sys.stderr)
                raise KeyboardInterrupt
            if cfg.train.patience is not None and evaluated and world_size > 1:
                # Only rank 0 has the AP: it decides early stopping, every rank follows (a collective).
                verdict = torch.tensor(float(evaluations_since_best), device=device)
                evaluations_since_best = int(all_reduce_sum(verdict).item())
            if cfg.train.patience is not None and evaluations_since_best >= cfg.train.patience:
                stopped = f"early stopping: no better val AP in {cfg.train.patience} evaluations"
                break

    # ---- plots and summary
    bad_images = sorted(set(getattr(train_set, "bad_images", [])) | set(getattr(val_set, "bad_images", [])))
    result: dict[str, Any] = {"output_dir": str(out_dir), "iterations": iteration, "best_ap": best_ap,
                              "stopped": stopped, "skipped_steps": skipped_steps, "bad_images": len(bad_images),
                              "data_workers": workers,
                              "minutes": (time.perf_counter() - start_time) / 60}
    if is_main:
        from detfocal.evaluation.plots import plot_training_curves, write_reports

        written = plot_training_curves(out_dir / "metrics.jsonl", out_dir)
        if evaluator is not None:
            written += write_reports(evaluator, out_dir)
            written.append(evaluator.write_results(out_dir / "results.json"))
        if writer is not None:
            writer.close()
        print(f"\ndone ({stopped}): {iteration} iterations, {result['minutes']:.1f} min; best val AP {best_ap:.4f}")
        if bad_images:
            print(f"skipped {len(bad_images)} undecodable image(s) (data.skip_bad_images), e.g. {bad_images[0]}")
        if summary:
            print(format_summary(summary))
            written.append(write_json_atomic(out_dir / "metrics.json", summary))
            result |= summary
        print("wrote: " + ", ".join(str(path) for path in [out_dir / "last.pth", *written]))
    return result


@torch.no_grad()
def _log_evaluation(writer: Any, model: nn.Module, val_set: Any, evaluator: Any, summary: Mapping[str, Any],
                    iteration: int, device: torch.device) -> None:
    """TensorBoard at an evaluation: the 12 COCO stats, the PR curves and a few drawn val images."""
    from detfocal.evaluation.plots import figure_pr_curves

    log_scalars(writer, "val", {name: summary[name] for name in STAT_NAMES if name in summary}, iteration)
    writer.add_figure("val/pr_curves", figure_pr_curves(evaluator), iteration)
    was_training = model.training
    model.eval()
    for index in range(min(NUM_TENSORBOARD_IMAGES, len(val_set))):
        image, target = val_set[index]
        detections = model([image.to(device)])[0]
        keep = detections["scores"] >= 0.3
        drawn = draw_detections(image, detections["boxes"][keep].cpu(), detections["labels"][keep].cpu(),
                                val_set.category_names, scores=detections["scores"][keep].cpu(),
                                gt_boxes=target["boxes"], min_draw_size=256)
        writer.add_image(f"val/image_{target['image_id']}", drawn, iteration)
    model.train(was_training)
