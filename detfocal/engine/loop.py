"""The loop stage of :func:`detfocal.train`: steps, epoch ends, stops and the finish.

:func:`run_loop` fits on one screen: load a batch, set the lr, :func:`train_step`, count,
tell the callbacks, and at epoch ends :func:`end_epoch` (evaluate, keep the best, checkpoint).
A stop signal ends the run through :func:`stop_on_signal` after the step it arrived in.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from detfocal.config import config_to_dict
from detfocal.data.coco import CocoDetection
from detfocal.engine.callbacks import CallbackList, Run
from detfocal.engine.checkpoint import capture_rng_state, save_checkpoint
from detfocal.engine.evaluate import evaluate
from detfocal.engine.optim import set_lr
from detfocal.engine.signals import Interrupted, StopRequest
from detfocal.engine.step import train_step
from detfocal.evaluation.coco import STAT_NAMES, CocoEvaluator
from detfocal.utils._compat import shutdown_workers
from detfocal.utils.comm import all_reduce_sum
from detfocal.utils.io import write_json_atomic

__all__ = ["Data", "EpochMeter", "Parts", "checkpoint_state", "end_epoch", "evaluate_and_keep_best", "finish",
           "run_loop", "stop_on_signal"]

logger = logging.getLogger(__name__)


def checkpoint_state(run: Run, parts: Parts, data: Data, meter: EpochMeter | None = None) -> dict[str, Any]:
    """Everything needed to continue, as plain data (``torch.load(weights_only=True)`` reads it)."""
    ema = parts.ema
    return {"model": parts.model_without_ddp.state_dict(), "optimizer": parts.optimizer.state_dict(),  # type: ignore
            "scaler": parts.scaler.state_dict() if parts.scaler else None, "iteration": run.iteration,
            "epoch": run.iteration // run.iters_per_epoch, "rng": capture_rng_state(), "best_ap": run.best_ap,
            "skipped_steps": run.skipped_steps, "evaluations_since_best": run.evaluations_since_best,
            "ema": None if ema is None else ema.module.state_dict(),
            "ema_updates": 0 if ema is None else int(ema.n_averaged), "config": config_to_dict(run.config),
            "num_classes": data.num_classes, "run_id": run.run_id, "evaluation_pending": run.evaluation_pending,
            "epoch_progress": {} if meter is None else meter.state(),
            "label_to_category_id": list(data.train_set.label_to_category_id),
            "category_names": list(data.train_set.category_names)}



@dataclass
class Data:
    """What the data stage builds (:func:`detfocal.engine.train.build_data`): the datasets and their class list."""

    train_set: CocoDetection
    val_set: CocoDetection
    num_classes: int


@dataclass
class Parts:
    """What the model and optimization stages build; the loop only reads these."""

    model: nn.Module  # DDP-wrapped under torchrun
    model_without_ddp: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    train_loader: DataLoader
    val_loader: DataLoader
    workers: int
    optimizer: torch.optim.Optimizer | None = None
    lr_schedule: Callable[[int], float] | None = None
    scaler: torch.amp.GradScaler | None = None
    ema: Any = None
    notes: list[str] = field(default_factory=list)  # what the stages chose, logged once the run's log file is open


class EpochMeter:
    """Sums of the losses, images and time since the epoch (or this process) started."""

    def __init__(self, progress: Mapping[str, Any] | None = None) -> None:
        progress = progress or {}
        self.sums: dict[str, float] = {str(k): float(v) for k, v in progress.get("sums", {}).items()}
        self.steps, self.images = int(progress.get("steps", 0)), int(progress.get("images", 0))
        self.lr = 0.0
        self.start = time.perf_counter() - float(progress.get("seconds", 0.0))

    def state(self) -> dict[str, Any]:
        """The running sums as plain data, so a mid-epoch resume reports the whole epoch's means."""
        return {"sums": dict(self.sums), "steps": self.steps, "images": self.images,
                "seconds": time.perf_counter() - self.start}

    def add(self, run: Run, logged: Mapping[str, float], lr: float, images: int) -> dict[str, Any]:
        """Count one step; returns the step's logs for the callbacks."""
        self.steps, self.images, self.lr = self.steps + 1, self.images + images, lr
        losses = {name: logged[name] for name in ("classification", "bbox_regression", "loss") if name in logged}
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        images_per_s = self.images / max(time.perf_counter() - self.start, 1e-9)
        return {"epoch": run.epoch, "step": run.iteration, "lr": lr,
                **{k: v for k, v in logged.items() if k not in ("stop", "skipped")},
                "skipped_steps": run.skipped_steps, "images_per_s": images_per_s}

    def epoch_record(self, run: Run) -> dict[str, Any]:
        """The epoch's means and speed."""
        seconds = time.perf_counter() - self.start
        record = {"epoch": run.epoch, "step": run.iteration, "lr": self.lr, "seconds": seconds,
                  "images_per_s": self.images / max(seconds, 1e-9), "skipped_steps": run.skipped_steps,
                  **{name: total / max(self.steps, 1) for name, total in self.sums.items()}}
        return record

    def restart(self) -> None:
        """Start the next epoch's sums and clock (after the epoch end's evaluation and checkpoint)."""
        self.__init__()  # type: ignore[misc]


def _to_device(batch: tuple[Sequence[torch.Tensor], Sequence[Mapping[str, Any]]], device: torch.device) -> tuple:
    images, targets = batch
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets


def run_loop(cfg: Any, run: Run, parts: Parts, data: Data, callbacks: CallbackList | None, folder: Any,
             stop: StopRequest, rank: int, world_size: int) -> dict[str, Any]:
    """Loop stage: a step per iteration until ``total_iters``, a stop signal or a requested stop."""
    is_main, meter, stopped = rank == 0, EpochMeter(run.epoch_progress), "error"
    try:
        if is_main:
            callbacks.on_run_start(run)
        if run.evaluation_pending:  # stopped or killed before the last epoch end's evaluation
            record = meter.epoch_record(run)
            evaluate_and_keep_best(cfg, run, parts, data, callbacks, folder, is_main, record)
            if is_main:
                _save(run, parts, data, callbacks, folder, "last")
                callbacks.on_epoch_end(run, record)
            meter.restart()
        parts.model.train()
        batches = iter(parts.train_loader)  # one loader, one set of workers, for the whole run
        stop.in_loop = True  # from here on a signal waits for the step boundary
        while run.iteration < run.total_iters:
            images, targets = _to_device(next(batches), parts.device)
            lr = cfg.train.lr * parts.lr_schedule(run.iteration)
            set_lr(parts.optimizer, lr)
            logged = train_step(parts.model, images, targets, parts.optimizer, amp_dtype=parts.amp_dtype,
                                scaler=parts.scaler, grad_clip=cfg.train.grad_clip, stop_requested=stop.is_requested,
                                iteration=run.iteration)
            run.iteration += 1
            run.skipped_steps += int(logged["skipped"])
            if parts.ema is not None and not logged["skipped"]:
                parts.ema.update_parameters(parts.model_without_ddp)
            logs = meter.add(run, logged, lr, len(images) * world_size)
            if is_main:
                callbacks.on_step_end(run, logs)
            # A stop on the last step is no stop: the run is complete, and evaluates as usual.
            signalled = logged["stop"] > 0 and run.iteration < run.total_iters
            if run.at_epoch_end:
                end_epoch(cfg, run, parts, data, callbacks, folder, meter, rank, world_size, signalled)
                meter.restart()
            if signalled:
                stop_on_signal(run, parts, data, callbacks, folder, meter, stop.signum, is_main)
            if run.stop_reason is not None and run.at_epoch_end:  # a callback's request, after the checkpoint
                break
        default = "completed" if cfg.train.max_iters is None or run.total_iters < cfg.train.max_iters else "max_iters"
        stopped = run.stop_reason or default
    except KeyboardInterrupt:
        stopped = "interrupted"
        raise
    finally:
        for loader in (parts.train_loader, parts.val_loader):
            shutdown_workers(loader)
        summary = finish(run, data, callbacks, stopped, is_main, parts.workers)
    return summary


def _save(run: Run, parts: Parts, data: Data, callbacks: CallbackList, folder: Any, kind: str,
          meter: EpochMeter | None = None) -> Path:
    state = checkpoint_state(run, parts, data, meter)
    path = save_checkpoint(run.output_dir / f"{kind}.pth", state)
    folder.checkpoint_written()
    callbacks.on_checkpoint(run, path, kind)
    return path


def evaluate_and_keep_best(cfg: Any, run: Run, parts: Parts, data: Data, callbacks: CallbackList | None,
                           folder: Any, is_main: bool, record: dict[str, Any]) -> None:
    """COCO-evaluate the (EMA) model on the val split; keep best.pth; add the stats to ``record``."""
    # fp32 inference, as torchvision's references: 16-bit box regression loses whole pixels.
    run.evaluator = CocoEvaluator(data.val_set.coco, data.val_set.label_to_category_id, backend=cfg.eval.backend)
    run.stats = evaluate(run.eval_model, parts.val_loader, run.evaluator, parts.device, is_main=is_main,
                         progress=is_main and sys.stderr.isatty())
    run.evaluation_pending = False
    parts.model.train()
    if is_main:
        record.update({name: run.stats[name] for name in STAT_NAMES if name in run.stats})
        improved = run.stats["AP"] > run.best_ap
        run.best_ap = max(run.best_ap, run.stats["AP"])
        run.evaluations_since_best = 0 if improved else run.evaluations_since_best + 1
        callbacks.on_evaluation_end(run, run.stats)
        if improved:
            _save(run, parts, data, callbacks, folder, "best")


def end_epoch(cfg: Any, run: Run, parts: Parts, data: Data, callbacks: CallbackList | None, folder: Any,
              meter: EpochMeter, rank: int, world_size: int, signalled: bool) -> None:
    """At an epoch end: checkpoint, evaluate when due (not when a stop signal waits), keep the best
    weights, checkpoint again, agree on stopping.

    last.pth is written before the evaluation, marked as awaiting it: a kill during a long
    evaluation loses no training, and the resumed run evaluates first.
    """
    is_main = rank == 0
    record = meter.epoch_record(run)
    due = (run.epoch + 1) % cfg.eval.interval == 0 or run.iteration == run.total_iters
    run.evaluation_pending = due
    if is_main:  # with an evaluation to come, the epoch's sums go along for its record
        _save(run, parts, data, callbacks, folder, "last", meter if due else None)
        (run.output_dir / "interrupted.pth").unlink(missing_ok=True)  # last.pth is newer now
    if signalled and due:
        return  # evaluate after the resume: the kill that follows a signal will not wait for it
    if due:
        evaluate_and_keep_best(cfg, run, parts, data, callbacks, folder, is_main, record)
        if is_main:
            _save(run, parts, data, callbacks, folder, "last")
    if is_main:
        callbacks.on_epoch_end(run, record)
    if world_size > 1:
        # Only rank 0 hears the callbacks (early stopping): it decides, every rank follows (a collective).
        verdict = all_reduce_sum(torch.full((), float(run.stop_reason is not None), device=parts.device))
        if verdict.item() > 0 and run.stop_reason is None:
            run.request_stop("stopped by a callback on rank 0")


def stop_on_signal(run: Run, parts: Parts, data: Data, callbacks: CallbackList | None, folder: Any,
                   meter: EpochMeter, signum: int | None, is_main: bool) -> None:
    """After the step at which a stop signal arrived: save interrupted.pth (unless last.pth was just
    written at an epoch end) and raise :class:`Interrupted`."""
    import signal as signal_module

    signum = signum or signal_module.SIGTERM  # the other ranks learn of it only through the step's sync
    if is_main:
        if run.at_epoch_end:
            logger.warning("interrupted: saved last.pth at the end of epoch %d; resume with --resume", run.epoch)
        else:
            path = _save(run, parts, data, callbacks, folder, "interrupted", meter)
            logger.warning("interrupted: saved %s at step %d; resume with --resume", path, run.iteration)
    raise Interrupted(signum, f"stopped by {signal_module.Signals(signum).name} at step {run.iteration}")


def finish(run: Run, data: Data, callbacks: CallbackList | None, stopped: str, is_main: bool,
           workers: int) -> dict[str, Any]:
    """Finish stage: results.json and metrics.json, the run-end callbacks (plots), the summary."""
    bad_images = sorted(set(getattr(data.train_set, "bad_images", [])) | set(getattr(data.val_set, "bad_images", [])))
    result: dict[str, Any] = {"output_dir": str(run.output_dir), "run_id": run.run_id, "iterations": run.iteration,
                              "best_ap": run.best_ap, "stopped": stopped, "skipped_steps": run.skipped_steps,
                              "bad_images": len(bad_images), "data_workers": workers,
                              "minutes": (time.perf_counter() - run.started) / 60}
    if not is_main:
        return result
    failed = stopped in ("error", "interrupted")
    try:
        if run.evaluator is not None and run.stats and not failed:
            run.evaluator.write_results(run.output_dir / "results.json")
            write_json_atomic(run.output_dir / "metrics.json", run.stats)
            result |= run.stats
        callbacks.on_run_end(run, result)
    except Exception as exc:
        if not failed:
            raise
        logger.warning("while closing the stopped run: %s", exc)  # the stop's own error matters more
        return result
    logger.info("done (%s): %d iterations, %.1f min; best val AP %.4f", stopped, run.iteration, result["minutes"],
                run.best_ap)
    if bad_images:
        logger.warning("skipped %d undecodable image(s) (data.skip_bad_images), e.g. %s", len(bad_images),
                       bad_images[0])
    return result
