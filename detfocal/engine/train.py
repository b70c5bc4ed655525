"""The training loop: ``detfocal.train(config)``.

It reads top to bottom in named stages, like detectron2's ``plain_train_net.py``:
:func:`build_data` -> :func:`build_model` -> :func:`build_optimization` -> :func:`restore`
-> :func:`run_loop` (train steps; at epoch ends :func:`end_epoch` evaluates and checkpoints)
-> :func:`finish`. One counter, ``run.iteration``, drives the lr schedule, ``max_iters``,
logging, evaluation and mid-epoch resume. The outside world hears from the loop through
callbacks (:mod:`detfocal.engine.callbacks`), called by name at each event; metrics.jsonl,
TensorBoard, the progress lines, early stopping and the plots are callbacks too.

Example:
    >>> import detfocal
    >>> summary = detfocal.train("configs/shapes_retinanet_r18.yaml", "runs/demo")  # doctest: +SKIP
    >>> summary["best_ap"]  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from detfocal.config import (config_from_dict, config_to_dict, config_to_yaml, data_paths, dataset_kwargs, load_config,
                             model_kwargs, optimizer_kwargs, scheduler_kwargs, shapes_kwargs, transform_kwargs)
from detfocal.data import CocoDetection, build_transforms, collate_fn
from detfocal.data.sampler import ResumableBatchSampler
from detfocal.data.shapes import ensure_dataset
from detfocal.engine.callbacks import (CALLBACK_EVENTS, CallbackList, EarlyStopping, MetricsFile, Plots, ProgressLog,
                                       Run, TensorBoard)
from detfocal.engine.checkpoint import check_compatible, load_checkpoint, load_detector_weights, restore_rng_state
from detfocal.engine.loop import Data, Parts, run_loop
from detfocal.engine.optim import build_ema, build_lr_schedule, build_optimizer
from detfocal.engine.precision import resolve_amp
from detfocal.engine.run_dir import RunFolder, choose_resume_checkpoint
from detfocal.engine.signals import STOP_SIGNALS, StopRequest
from detfocal.engine.step import train_step
from detfocal.engine.workers import resolve_workers
from detfocal.modeling.validate import check_model_config
from detfocal.utils.comm import cleanup, get_world_size, init_distributed, is_dist_initialized
from detfocal.utils.logger import log_to_file
from detfocal.utils.registry import DETECTORS

__all__ = ["Data", "Parts", "build_data", "build_model", "build_optimization", "builtin_callbacks", "restore", "train",
           "train_step"]

logger = logging.getLogger(__name__)


def train(config: str | Path | Any, output_dir: str | Path | None = None, resume: str | Path | bool | None = None,
          *, overrides: Sequence[str] = (), overwrite: bool = False, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train a detector as the config says; the function behind ``detfocal train``.

    Under torchrun every process calls it; rank 0 writes the files into ``output_dir``:
    run.json (the run's id), config.yaml, log.txt, metrics.jsonl (one JSON line per logged
    step and per epoch), last.pth and best.pth (by val AP) at epoch ends, interrupted.pth on
    Ctrl-C/SIGTERM/SIGUSR1 (at a step boundary, resumable mid-epoch), results.json,
    metrics.json and the plots.

    Args:
        config: a YAML path or a loaded config (``detfocal.config.load_config``).
        output_dir: the run folder; default ``runs/<config file name>``.
        resume: a checkpoint to continue from, or True for the one of OUT/interrupted.pth and
            OUT/last.pth with the most iterations; None starts a new run.
        overrides: ``key=value`` strings applied to the config (``--set``).
        overwrite: replace the run already in ``output_dir`` (its files only, once the new
            run has passed its checks).
        callbacks: objects with any of the :class:`~detfocal.engine.callbacks.Callback`
            events, called on rank 0 after the built-in ones.

    Returns:
        ``{"output_dir", "run_id", "iterations", "best_ap", "stopped", "skipped_steps",
        "bad_images", "data_workers", "minutes"}`` plus the last evaluation's COCO stats and
        ``per_class`` (rank 0; other ranks get the same keys without the stats).

    Raises:
        ValueError, FileNotFoundError: bad config, data, output folder or checkpoint.
        OSError: a file cannot be written (disk full); the last good checkpoint stays.
        FloatingPointError: a non-finite loss or (fp32/bf16) gradient; last.pth is untouched.
        Interrupted: (a KeyboardInterrupt) after a stop signal, once interrupted.pth is written.
    """
    overrides, callbacks = _check_arguments(overrides, resume, callbacks)
    if isinstance(config, (str, Path)):
        cfg = load_config(config, overrides)
        default_dir = Path("runs") / Path(config).stem
    elif isinstance(config, Mapping):
        cfg = config_from_dict(config, overrides)
        default_dir = Path("runs") / "run"
    else:
        cfg = config_from_dict(config_to_dict(config), overrides) if overrides else config
        default_dir = Path("runs") / "run"
    out_dir = Path(output_dir) if output_dir is not None else default_dir
    check_model_config(config_to_dict(cfg)["model"], imports=cfg.imports)  # before any folder or data work
    owns_process_group = not is_dist_initialized()
    rank, local_rank, world_size, device = init_distributed()
    try:
        checkpoint, checkpoint_path = read_resume_checkpoint(out_dir, resume)
        folder = (RunFolder(out_dir, checkpoint=checkpoint, checkpoint_path=checkpoint_path, overwrite=overwrite)
                  if rank == 0 else contextlib.nullcontext())
        # Signals are caught from here on: before the loop they stop at once (nothing to save yet),
        # and a folder being --overwrite-n gets its old run back on the way out.
        with StopRequest() as stop, folder:  # locked, checked; nothing is replaced before start()
            _seed_everything(cfg.train.seed + rank, cfg.train.deterministic)  # each rank its own augmentations
            data = build_data(cfg, rank, world_size, checkpoint, checkpoint_path)
            parts = build_model(cfg, data, device, rank, local_rank, world_size, checkpoint)
            run = build_optimization(cfg, data, parts, out_dir)
            notes = restore(cfg, run, parts, checkpoint, checkpoint_path, is_main=rank == 0)
            all_callbacks = CallbackList(builtin_callbacks(cfg, out_dir) + list(callbacks)) if rank == 0 else None
            log_file = None
            if rank == 0:
                run.run_id = folder.start(config_to_yaml(cfg))
                log_file = log_to_file(out_dir / "log.txt")
            try:
                for note in notes:
                    logger.info(note)
                return run_loop(cfg, run, parts, data, all_callbacks, folder, stop, rank, world_size)
            finally:
                if log_file is not None:
                    logging.getLogger("detfocal").removeHandler(log_file)
                    log_file.close()
    finally:
        if owns_process_group:
            cleanup()


def _check_arguments(overrides: Any, resume: Any, callbacks: Any) -> tuple[list[str], list[Any]]:
    """Refuse, in one line, arguments that would fail late or do nothing."""
    if isinstance(overrides, (str, bytes)) or not all(isinstance(item, str) for item in overrides):
        raise ValueError(f"overrides: expected a list of 'key=value' strings, got {overrides!r:.80}")
    if not (resume is None or isinstance(resume, (bool, str, os.PathLike))):
        raise ValueError(f"resume: expected a checkpoint path, True or None, got {resume!r:.80}")
    if isinstance(callbacks, (str, bytes)):
        raise ValueError(f"callbacks: expected a list of callback objects, got {callbacks!r:.80}")
    for callback in callbacks:
        if isinstance(callback, type):
            raise ValueError(f"callbacks: {callback.__name__} is a class; pass an instance, "
                             f"{callback.__name__}()")
        if not any(callable(getattr(callback, event, None)) for event in CALLBACK_EVENTS):
            raise ValueError(f"callbacks: {callback!r:.80} has none of the events {', '.join(CALLBACK_EVENTS)}")
    return list(overrides), list(callbacks)


# ----------------------------------------------------------------------------------------------
# The stages, in the order train() calls them


def read_resume_checkpoint(out_dir: Path, resume: str | Path | bool | None) -> tuple[dict | None, Path | None]:
    """The checkpoint to continue from: ``resume`` itself, or (True or "") OUT's most advanced one."""
    if resume is None or resume is False:
        return None, None
    path = choose_resume_checkpoint(out_dir) if resume in (True, "") else Path(resume)  # type: ignore[arg-type]
    return load_checkpoint(path), path


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_data(cfg: Any, rank: int, world_size: int, checkpoint: Mapping[str, Any] | None = None,
               checkpoint_path: Path | None = None) -> Data:
    """Data stage: generate the shapes data if configured (rank 0; the others wait), build both splits."""
    if cfg.data.shapes is not None and rank == 0:
        ensure_dataset(**shapes_kwargs(cfg))
    if world_size > 1:
        torch.distributed.barrier()
    paths = data_paths(cfg.data)
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
    return Data(train_set, val_set, num_classes)


def _init_worker(worker_id: int) -> None:
    """DataLoader workers: derive Python's and NumPy's seeds from the per-worker torch seed, and
    leave the stop signals to the training process.

    SLURM's preemption and Ctrl-C signal the whole process group; a worker that died of it
    would end the run before the training process could save at its step boundary.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)


def build_model(cfg: Any, data: Data, device: torch.device, rank: int, local_rank: int, world_size: int,
                checkpoint: Mapping[str, Any] | None) -> Parts:
    """Model stage: the detector, its precision, the data loaders (workers are measured on the model)."""
    model = DETECTORS.get(cfg.model.type)(**model_kwargs(cfg, data.num_classes)).to(device)
    amp_dtype, channels_last, amp_note = resolve_amp(cfg.train.amp, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch_size = cfg.train.batch_size
    # Before any weights are loaded or wrapped: the measurement leaves model and RNGs as they were.
    workers, workers_note = resolve_workers(cfg.data.workers, data.train_set, batch_size, collate_fn, model, device,
                                            amp_dtype=amp_dtype, deterministic=cfg.train.deterministic,
                                            # Without torchrun's LOCAL_WORLD_SIZE, assume every process shares this node.
                                            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    start = int(checkpoint.get("iteration", checkpoint.get("global_step", 0))) if checkpoint else 0
    sampler = ResumableBatchSampler(len(data.train_set), batch_size, seed=cfg.train.seed, rank=rank,
                                    world_size=world_size, start_iteration=start)
    # Dedicated generators: creating a loader's iterator must not draw from the global RNG,
    # which drives the augmentations and is saved in checkpoints.
    loader_options = {"num_workers": workers, "collate_fn": collate_fn, "persistent_workers": workers > 0,
                      "pin_memory": device.type == "cuda"}
    train_loader = DataLoader(data.train_set, batch_sampler=sampler, worker_init_fn=_init_worker,
                              generator=torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + start + rank),
                              **loader_options)
    # Each rank evaluates every world_size-th image, with no padding repeats.
    val_loader = DataLoader(data.val_set, batch_size=cfg.eval.batch_size, generator=torch.Generator(),
                            sampler=list(range(rank, len(data.val_set), world_size)), worker_init_fn=_init_worker,
                            **loader_options)
    model_without_ddp = model
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    return Parts(model, model_without_ddp, device, amp_dtype, train_loader, val_loader, workers,
                 notes=[amp_note] + ([workers_note] if workers_note else []))


def build_optimization(cfg: Any, data: Data, parts: Parts, out_dir: Path) -> Run:
    """Optimization stage: optimizer, lr schedule, GradScaler, fine-tuning weights, EMA; the run's state."""
    iters_per_epoch = parts.train_loader.batch_sampler.iters_per_epoch  # type: ignore[union-attr]
    total_iters = cfg.train.epochs * iters_per_epoch
    if cfg.train.max_iters is not None:
        total_iters = min(total_iters, cfg.train.max_iters)
    parts.optimizer = build_optimizer(parts.model_without_ddp, **optimizer_kwargs(cfg))
    parts.lr_schedule = build_lr_schedule(**scheduler_kwargs(cfg), total_iters=total_iters)
    parts.scaler = torch.amp.GradScaler(parts.device.type) if parts.amp_dtype is torch.float16 else None
    ema_model = None
    if cfg.train.ema is not None:
        parts.ema = build_ema(parts.model_without_ddp, decay=cfg.train.ema.decay,
                              warmup_iters=cfg.train.ema.warmup_iters)
        ema_model = parts.ema.module
    parts.notes.append(f"data: {len(data.train_set)} train / {len(data.val_set)} val images, {data.num_classes} "
                       f"classes; batch {cfg.train.batch_size} x {get_world_size()} process(es); {iters_per_epoch} "
                       f"iterations per epoch, {total_iters} in all; output: {out_dir}")
    # Evaluation and best.pth use the EMA weights when there are any.
    return Run(output_dir=out_dir, config=cfg, model=parts.model_without_ddp,
               eval_model=ema_model or parts.model_without_ddp, val_set=data.val_set, total_iters=total_iters,
               iters_per_epoch=iters_per_epoch)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``, to name the keys that differ."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= _flatten(value, f"{prefix}{key}.") if isinstance(value, Mapping) else {f"{prefix}{key}": value}
    return flat


def restore(cfg: Any, run: Run, parts: Parts, checkpoint: Mapping[str, Any] | None, checkpoint_path: Path | None,
            *, is_main: bool) -> list[str]:
    """Restore stage: fine-tuning weights for a new run, or everything a checkpoint holds; returns log lines."""
    notes = list(parts.notes)
    if checkpoint is None:
        if cfg.model.weights is not None:  # fine-tuning; the EMA (built above) starts from these weights too
            notes.append(load_detector_weights(parts.model_without_ddp, cfg.model.weights))
            if parts.ema is not None:
                parts.ema.module.load_state_dict(parts.model_without_ddp.state_dict())
        return notes
    parts.model_without_ddp.load_state_dict(checkpoint["model"])
    previous = checkpoint.get("config", {}).get("train", {}).get("optimizer", cfg.train.optimizer)
    if previous != cfg.train.optimizer:
        raise ValueError(f"train.optimizer: the checkpoint's optimizer state is {previous!r}, cannot resume "
                         f"it as {cfg.train.optimizer!r}")
    parts.optimizer.load_state_dict(checkpoint["optimizer"])  # type: ignore[union-attr]
    if parts.scaler is not None and checkpoint.get("scaler"):
        parts.scaler.load_state_dict(checkpoint["scaler"])
    if parts.ema is not None and checkpoint.get("ema") is not None:
        parts.ema.module.load_state_dict(checkpoint["ema"])
        parts.ema.n_averaged.fill_(int(checkpoint["ema_updates"]))
    run.iteration = run.start_iteration = int(checkpoint.get("iteration", checkpoint.get("global_step", 0)))
    run.best_ap, run.skipped_steps = float(checkpoint["best_ap"]), int(checkpoint.get("skipped_steps", 0))
    run.evaluations_since_best = int(checkpoint.get("evaluations_since_best", 0))
    run.evaluation_pending = bool(checkpoint.get("evaluation_pending", False))
    run.epoch_progress = dict(checkpoint.get("epoch_progress") or {})
    if is_main:  # only rank 0's streams are saved; the other ranks keep their fresh seeds
        restore_rng_state(checkpoint["rng"])
        before, now = _flatten(checkpoint.get("config", {})), _flatten(config_to_dict(cfg))
        changed = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
        if changed:
            notes.append(f"note: resuming with {len(changed)} config values changed ({', '.join(changed[:8])}); "
                         f"the optimizer state (momentum) still comes from the checkpoint")
        notes.append(f"resumed from {checkpoint_path} at step {run.iteration} "
                     f"(epoch {run.iteration / run.iters_per_epoch:.2f}), best AP {run.best_ap:.4f}")
    return notes


def builtin_callbacks(cfg: Any, out_dir: Path) -> list[Any]:
    """detfocal's own callbacks for a config: progress lines, metrics.jsonl, TensorBoard, early stopping, plots."""
    interval = cfg.train.log_interval
    callbacks: list[Any] = [ProgressLog(interval), MetricsFile(out_dir / "metrics.jsonl", interval)]
    if cfg.train.tensorboard:
        callbacks.append(TensorBoard(out_dir / "tensorboard", interval))
    if cfg.train.patience is not None:
        callbacks.append(EarlyStopping(cfg.train.patience))
    return callbacks + [Plots(out_dir / "metrics.jsonl", out_dir)]
