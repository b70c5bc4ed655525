"""Callbacks: what the training loop tells the outside world, by name, at six moments.

The loop in :mod:`detfocal.engine.train` calls each event visibly, in order; there are no
hooks hidden in a trainer class. detfocal's own metrics.jsonl, TensorBoard, progress lines,
early stopping and plots are callbacks on this same protocol, so a user's callback (an
experiment tracker, a message when a run ends, a check of their own) can do what ours do.

Callbacks run on rank 0 only, the process that writes the run's files; a callback must
therefore not call a collective. Every event receives the :class:`Run`, the loop's state.

Example:
    >>> class PrintAP(Callback):
    ...     def on_evaluation_end(self, run, stats):
    ...         print(f"step {run.iteration}: AP {stats['AP']:.3f}")
    >>> detfocal.train("configs/shapes_retinanet_r18.yaml", callbacks=[PrintAP()])  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from torch import nn

from detfocal.evaluation.coco import STAT_NAMES
from detfocal.utils.io import append_jsonl, atomic_write, read_jsonl

__all__ = ["CALLBACK_EVENTS", "Callback", "CallbackList", "EarlyStopping", "MetricsFile", "Plots", "ProgressLog", "Run", "TensorBoard"]

logger = logging.getLogger(__name__)

CALLBACK_EVENTS = ("on_run_start", "on_step_end", "on_evaluation_end", "on_epoch_end", "on_checkpoint", "on_run_end")


@dataclass
class Run:
    """The state of a training run, as the loop keeps it and callbacks read it.

    The loop advances ``iteration`` (the one counter behind the lr schedule, logging,
    evaluation and resume) and the bookkeeping below; a callback may call
    :meth:`request_stop` and otherwise only read.
    """

    output_dir: Path
    config: Any
    model: nn.Module
    eval_model: nn.Module
    val_set: Any
    total_iters: int
    iters_per_epoch: int
    start_iteration: int = 0
    iteration: int = 0
    best_ap: float = -1.0
    evaluations_since_best: int = 0
    skipped_steps: int = 0
    run_id: str = ""
    evaluation_pending: bool = False  # last.pth was written before its epoch end's evaluation finished
    epoch_progress: dict[str, Any] = field(default_factory=dict)  # a resumed epoch's loss sums so far
    evaluator: Any = None  # the last evaluation's CocoEvaluator
    stats: dict[str, Any] = field(default_factory=dict)  # and its COCO stats
    stop_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def epoch(self) -> int:
        """The epoch of the step just taken (0-based)."""
        return max(self.iteration - 1, 0) // self.iters_per_epoch

    @property
    def at_epoch_end(self) -> bool:
        """Whether the step just taken ended an epoch (or the run)."""
        return self.iteration % self.iters_per_epoch == 0 or self.iteration == self.total_iters

    def is_log_step(self, interval: int) -> bool:
        """Every ``interval`` steps, the first step of an epoch or of this process, and epoch ends."""
        return (self.iteration % interval == 0 or self.at_epoch_end or self.iteration == self.start_iteration + 1
                or (self.iteration - 1) % self.iters_per_epoch == 0)

    def request_stop(self, reason: str) -> None:
        """Stop the run at the next epoch end, after its evaluation and checkpoint, with ``reason``
        in its summary."""
        self.stop_reason = reason


class Callback:
    """Subclass and override the events you need; each does nothing by default.

    ``logs`` of :meth:`on_step_end` hold ``classification``, ``bbox_regression``, ``loss``,
    ``grad_norm`` (means over processes), ``lr``, ``epoch``, ``step``, ``skipped_steps`` and
    ``images_per_s``. ``stats`` of :meth:`on_evaluation_end` are the 12 COCO numbers
    (``AP``, ``AP50``, ...) and ``per_class``.
    """

    def on_run_start(self, run: Run) -> None:
        """Once, before the first step (also when resuming)."""

    def on_step_end(self, run: Run, logs: Mapping[str, float]) -> None:
        """After every optimizer step."""

    def on_evaluation_end(self, run: Run, stats: Mapping[str, Any]) -> None:
        """After each COCO evaluation (``run.evaluator`` holds the evaluator)."""

    def on_epoch_end(self, run: Run, record: Mapping[str, Any]) -> None:
        """At each epoch end: mean losses, speed and, when evaluated, the COCO stats."""

    def on_checkpoint(self, run: Run, path: Path, kind: str) -> None:
        """After ``path`` was written; ``kind`` is "last", "best" or "interrupted"."""

    def on_run_end(self, run: Run, summary: Mapping[str, Any]) -> None:
        """Once, however the run ended: ``summary["stopped"]`` says how (also "interrupted" and "error")."""


class CallbackList:
    """Calls an event on every callback, in order. Objects need only the events they use."""

    def __init__(self, callbacks: Iterable[Any] = ()) -> None:
        self.callbacks = list(callbacks)

    def _call(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is not None:
                method(*args)

    def on_run_start(self, run: Run) -> None:
        self._call("on_run_start", run)

    def on_step_end(self, run: Run, logs: Mapping[str, float]) -> None:
        self._call("on_step_end", run, logs)

    def on_evaluation_end(self, run: Run, stats: Mapping[str, Any]) -> None:
        self._call("on_evaluation_end", run, stats)

    def on_epoch_end(self, run: Run, record: Mapping[str, Any]) -> None:
        self._call("on_epoch_end", run, record)

    def on_checkpoint(self, run: Run, path: Path, kind: str) -> None:
        self._call("on_checkpoint", run, path, kind)

    def on_run_end(self, run: Run, summary: Mapping[str, Any]) -> None:
        """Every callback's ``on_run_end``, even when one of them fails (the first error is raised after)."""
        error: BaseException | None = None
        for callback in self.callbacks:
            method = getattr(callback, "on_run_end", None)
            try:
                if method is not None:
                    method(run, summary)
            except Exception as exc:  # the others still close their files
                error = error or exc
        if error is not None:
            raise error


# ----------------------------------------------------------------------------------------------
# Built-in callbacks


class ProgressLog(Callback):
    """A tqdm bar per epoch in a terminal; a plain log line every ``interval`` steps elsewhere."""

    def __init__(self, interval: int, interactive: bool | None = None) -> None:
        self.interval = interval
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar: Any = None

    def on_step_end(self, run: Run, logs: Mapping[str, float]) -> None:
        if self.interactive:
            if self.bar is None:
                from tqdm import tqdm

                epoch_end = min((run.epoch + 1) * run.iters_per_epoch, run.total_iters)
                self.bar = tqdm(total=epoch_end - run.iteration + 1, desc=f"epoch {run.epoch}", dynamic_ncols=True,
                                leave=False)
            self.bar.set_postfix({"loss": f"{logs['loss']:.3f}", "lr": f"{logs['lr']:.2e}",
                                  "img/s": f"{logs['images_per_s']:.1f}"}, refresh=False)
            self.bar.update()
        elif run.is_log_step(self.interval):
            logger.info("epoch %d step %d/%d: loss %.4f (cls %.4f, box %.4f), lr %.2e, %.1f img/s", run.epoch,
                        run.iteration, run.total_iters, logs["loss"], logs.get("classification", float("nan")),
                        logs.get("bbox_regression", float("nan")), logs["lr"], logs["images_per_s"])

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_epoch_end(self, run: Run, record: Mapping[str, Any]) -> None:
        self._close()
        line = f"epoch {record['epoch']}: loss {record.get('loss', float('nan')):.4f}, {record['images_per_s']:.1f} img/s"
        if "AP" in record:
            line += f", val AP {record['AP']:.4f} AP50 {record['AP50']:.4f}"
        if run.skipped_steps:
            line += f", {run.skipped_steps} steps skipped by the fp16 GradScaler so far"
        logger.info(line)

    def on_run_end(self, run: Run, summary: Mapping[str, Any]) -> None:
        self._close()


class MetricsFile(Callback):
    """``metrics.jsonl``: one JSON line per logged step (``"type": "train"``) and per epoch (``"epoch"``).

    On a resume, records after the checkpoint's iteration (steps that are about to be
    replayed after a kill) are dropped first, so no step appears twice.
    """

    def __init__(self, path: str | Path, interval: int) -> None:
        self.path = Path(path)
        self.interval = interval

    def on_run_start(self, run: Run) -> None:
        if not self.path.exists():
            return
        records = read_jsonl(self.path)
        kept = [record for record in records if int(record.get("step", 0)) <= run.start_iteration]
        if len(kept) != len(records) or self.path.read_bytes()[-1:] not in (b"", b"\n"):
            if len(kept) != len(records):
                logger.info("%s: dropped %d record(s) after step %d, the checkpoint's", self.path,
                            len(records) - len(kept), run.start_iteration)
            text = "".join(_json_line(record) for record in kept)
            atomic_write(self.path, lambda handle: handle.write(text), binary=False)

    def on_step_end(self, run: Run, logs: Mapping[str, float]) -> None:
        if run.is_log_step(self.interval):
            append_jsonl(self.path, {"type": "train", **logs})

    def on_epoch_end(self, run: Run, record: Mapping[str, Any]) -> None:
        append_jsonl(self.path, {"type": "epoch", **{k: v for k, v in record.items() if k != "per_class"}})


def _json_line(record: Mapping[str, Any]) -> str:
    import json

    return json.dumps(dict(record)) + "\n"


class TensorBoard(Callback):
    """TensorBoard events in ``log_dir``: train scalars at logged steps; at evaluations the 12 COCO
    stats, the PR curves and ``num_images`` val images drawn with their detections."""

    def __init__(self, log_dir: str | Path, interval: int, num_images: int = 4) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("train.tensorboard: true needs the tensorboard package (pip install tensorboard), "
                             "or set train.tensorboard=false") from None
        self.log_dir, self.interval, self.num_images = Path(log_dir), interval, num_images
        self.writer = SummaryWriter(str(self.log_dir))

    def _scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def on_step_end(self, run: Run, logs: Mapping[str, float]) -> None:
        if run.is_log_step(self.interval):
            self._scalars("train", {k: v for k, v in logs.items() if k not in ("epoch", "step")}, run.iteration)

    def on_evaluation_end(self, run: Run, stats: Mapping[str, Any]) -> None:
        import torch

        from detfocal.evaluation.draw import draw_detections
        from detfocal.evaluation.plots import figure_pr_curves

        self._scalars("val", {name: stats[name] for name in STAT_NAMES if name in stats}, run.iteration)
        self.writer.add_figure("val/pr_curves", figure_pr_curves(run.evaluator), run.iteration)
        model, val_set = run.eval_model, run.val_set
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            for index in range(min(self.num_images, len(val_set))):
                image, target = val_set[index]
                detections = model([image.to(device)])[0]
                keep = detections["scores"] >= 0.3
                drawn = draw_detections(image, detections["boxes"][keep].cpu(), detections["labels"][keep].cpu(),
                                        val_set.category_names, scores=detections["scores"][keep].cpu(),
                                        gt_boxes=target["boxes"], min_draw_size=256)
                self.writer.add_image(f"val/image_{target['image_id']}", drawn, run.iteration)
        model.train(was_training)

    def on_run_end(self, run: Run, summary: Mapping[str, Any]) -> None:
        self.writer.close()


class EarlyStopping(Callback):
    """Stop when ``patience`` evaluations in a row did not improve the best val AP."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def on_evaluation_end(self, run: Run, stats: Mapping[str, Any]) -> None:
        if run.evaluations_since_best >= self.patience:
            run.request_stop(f"early stopping: no better val AP in {self.patience} evaluations")


class Plots(Callback):
    """At the run's end: ``loss.png`` and ``ap.png`` from metrics.jsonl, and the last evaluation's
    ``per_class_ap.png``, ``pr_curves.png`` and ``per_class.csv``."""

    def __init__(self, metrics_path: str | Path, out_dir: str | Path) -> None:
        self.metrics_path, self.out_dir = Path(metrics_path), Path(out_dir)
        self.written: list[Path] = []

    def on_run_end(self, run: Run, summary: Mapping[str, Any]) -> None:
        from detfocal.evaluation.plots import plot_training_curves, write_reports

        if self.metrics_path.exists():
            self.written += plot_training_curves(self.metrics_path, self.out_dir)
        if run.evaluator is not None:
            self.written += write_reports(run.evaluator, self.out_dir)
