"""Train a RetinaNet with the focal head: ``python tools/train.py CONFIG [--set KEY=VALUE ...]``.

Reads top to bottom: parse -> config -> data -> model -> optimizer -> (resume) -> loop of
train_one_epoch / evaluate / checkpoint -> plots and summary.

    python tools/train.py configs/shapes_retinanet_r18.yaml
    python tools/train.py configs/shapes_retinanet_r18.yaml --set train.lr=0.02 model.head.gamma=1.5
    python tools/train.py configs/shapes_retinanet_r18.yaml --resume            # OUT/last.pth
    torchrun --nproc_per_node=4 tools/train.py configs/retinanet_r50_fpn_coco.yaml

Under torchrun ``train.batch_size`` is per process: the global batch is batch_size x world size
(the paper's 16 is 8 GPUs x 2). Add ``--nnodes=N --node_rank=I --rdzv_endpoint=HOST:PORT``
(or ``--master_addr/--master_port``) for several machines. Only rank 0 logs and writes files.

Writes to OUT (``--output-dir``, default ``runs/<config name>``): metrics.jsonl, last.pth,
best.pth (by val AP), results.json of the last evaluation, loss.png, ap.png, pr_curves.png and
per_class_ap.png; Ctrl-C writes interrupted.pth.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# libgomp's threads spin while they wait; when other processes share the cores (2 here) the
# spinning starves the work: a training step measured 8x slower. Passive waiting costs little
# on an idle machine. Set before torch starts its thread pool; the environment's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import random
import time
from functools import partial
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import detfocal.modeling.retinanet  # noqa: F401  (registers the built-in backbones, heads and detectors)
from detfocal.engine.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from detfocal.cli import run_cli
from detfocal.config import (config_to_dict, config_to_yaml, data_paths, dataset_kwargs, load_config,
                             model_kwargs, optimizer_kwargs, scheduler_kwargs, transform_kwargs)
from detfocal.data import CocoDetection, build_transforms, collate_fn
from detfocal.engine.distributed import cleanup, init_distributed
from detfocal.engine.train import (append_metrics, build_optimizer, build_scheduler, evaluate, format_summary,
                             plot_training_curves, resolve_amp, train_one_epoch)
from detfocal.evaluation.coco import STAT_NAMES, CocoEvaluator, write_plots
from detfocal.registry import DETECTORS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config, e.g. configs/shapes_retinanet_r18.yaml")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, each value parsed as YAML: train.lr=0.02 data.subset.categories=[person,dog]")
    parser.add_argument("--output-dir", type=Path, help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                        help="continue from CKPT (no value: OUTPUT_DIR/last.pth)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``, to name the keys that differ."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def seed_worker(worker_id: int) -> None:
    """DataLoader workers: derive Python's and NumPy's seeds from the per-worker torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    out_dir = args.output_dir or Path("runs") / Path(args.config).stem
    checkpoint = None
    if args.resume is not None:
        checkpoint = load_checkpoint(Path(args.resume) if args.resume else out_dir / "last.pth")

    rank, local_rank, world_size, device = init_distributed()
    is_main = rank == 0
    try:
        return train(cfg, out_dir, checkpoint, rank, local_rank, world_size, device, is_main)
    finally:
        cleanup()


def train(cfg: Any, out_dir: Path, checkpoint: dict | None, rank: int, local_rank: int, world_size: int,
          device: torch.device, is_main: bool) -> int:
    seed = cfg.train.seed
    # Each rank its own augmentation stream; DDP copies rank 0's initial weights to the others.
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # ---- data. Rank 0 generates the shapes data (if configured and missing); the others wait.
    paths = data_paths(cfg.data, generate=is_main)
    if world_size > 1:
        dist.barrier()
    train_images, train_annotations = paths["train"]
    val_images, val_annotations = paths["val"]
    train_set = CocoDetection(**dataset_kwargs(cfg, train_images, train_annotations),
                              transforms=build_transforms(train=True, **transform_kwargs(cfg)))
    val_set = CocoDetection(**dataset_kwargs(cfg, val_images, val_annotations), transforms=build_transforms(train=False))
    if val_set.label_to_category_id != train_set.label_to_category_id:
        raise ValueError(f"data.val.annotations: categories {val_set.label_to_category_id} differ from the training "
                         f"set's {train_set.label_to_category_id}; use the same category list or data.subset.categories")
    num_classes = cfg.model.num_classes or train_set.num_classes
    if num_classes != train_set.num_classes:
        raise ValueError(f"model.num_classes: {num_classes}, but {train_annotations} has {train_set.num_classes} "
                         f"categories (after data.subset); leave it null to take theirs")

    # The shuffling is a function of (seed, epoch) only (set_epoch below), also in one process.
    train_sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    loader_generator = torch.Generator()  # reseeded every epoch: worker seeds from (seed, epoch, rank)
    train_loader = DataLoader(train_set, batch_size=cfg.train.batch_size, sampler=train_sampler,
                              num_workers=cfg.data.workers, collate_fn=collate_fn, worker_init_fn=seed_worker,
                              generator=loader_generator, persistent_workers=False)
    # Each rank evaluates every world_size-th image, with no padding repeats. Its own generator
    # keeps evaluation from drawing on the global RNG, so evaluating does not change training.
    val_loader = DataLoader(val_set, batch_size=cfg.eval.batch_size, sampler=list(range(rank, len(val_set), world_size)),
                            num_workers=cfg.data.workers, collate_fn=collate_fn, generator=torch.Generator())

    # ---- model, precision, optimizer, schedule
    model = DETECTORS.get(cfg.model.type)(**model_kwargs(cfg, num_classes)).to(device)
    amp_dtype, channels_last, amp_note = resolve_amp(cfg.train.amp, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    iters_per_epoch = len(train_loader)
    total_iters = cfg.train.epochs * iters_per_epoch
    if cfg.train.max_iters is not None:
        total_iters = min(total_iters, cfg.train.max_iters)
    optimizer = build_optimizer(model_without_ddp, **optimizer_kwargs(cfg))
    scheduler = build_scheduler(optimizer, **scheduler_kwargs(cfg), total_iters=total_iters)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None

    start_epoch, best_ap = 0, -1.0
    if checkpoint is not None:
        previous = checkpoint.get("config", {}).get("train", {}).get("optimizer", cfg.train.optimizer)
        if previous != cfg.train.optimizer:
            raise ValueError(f"train.optimizer: the checkpoint's optimizer state is {previous!r}, cannot resume "
                             f"it as {cfg.train.optimizer!r}")
        model_without_ddp.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, best_ap = checkpoint["epoch"], checkpoint["best_ap"]
        if is_main:  # only rank 0's streams are saved; the other ranks keep their fresh seeds
            restore_rng_state(checkpoint["rng"])
        if is_main:
            before, now = flatten(checkpoint.get("config", {})), flatten(config_to_dict(cfg))
            changed = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
            if changed:
                print(f"note: resuming with {len(changed)} config values changed ({', '.join(changed[:8])}); the "
                      f"optimizer and lr schedule state (lr, momentum, weight decay) still come from the checkpoint")

    if is_main:
        print(amp_note)
        print(f"data: {len(train_set)} train / {len(val_set)} val images, {num_classes} classes; "
              f"batch {cfg.train.batch_size} x {world_size} process(es); {iters_per_epoch} iterations per epoch, "
              f"{total_iters} in all")
        if checkpoint is not None:
            print(f"resumed at epoch {start_epoch}, step {scheduler.last_epoch}, best AP {best_ap:.4f}")
        print(f"output: {out_dir}")

    def state(epoch_done: int) -> dict[str, Any]:
        """Everything needed to continue, as plain data (torch.load(weights_only=True) reads it)."""
        return {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "epoch": epoch_done, "global_step": scheduler.last_epoch, "rng": capture_rng_state(),
                "best_ap": best_ap, "config": config_to_dict(cfg), "num_classes": num_classes,
                "label_to_category_id": list(train_set.label_to_category_id),
                "category_names": list(train_set.category_names)}

    # ---- the loop
    metrics_writer = partial(append_metrics, out_dir / "metrics.jsonl") if is_main else None
    summary: dict[str, Any] = {}
    evaluator = None
    start_time = time.perf_counter()
    epochs_done = start_epoch
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            if cfg.train.max_iters is not None and scheduler.last_epoch >= cfg.train.max_iters:
                break
            train_sampler.set_epoch(epoch)
            loader_generator.manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)
            stats = train_one_epoch(model, optimizer, scheduler, train_loader, device, epoch, scaler=scaler,
                                    amp_dtype=amp_dtype, grad_clip=cfg.train.grad_clip,
                                    log_interval=cfg.train.log_interval, metrics_writer=metrics_writer,
                                    is_main=is_main, max_iters=cfg.train.max_iters)
            record = {"type": "epoch", "epoch": epoch, "step": scheduler.last_epoch,
                      "lr": optimizer.param_groups[0]["lr"], **stats}
            finished = epoch + 1 == cfg.train.epochs or (cfg.train.max_iters is not None
                                                         and scheduler.last_epoch >= cfg.train.max_iters)
            if (epoch + 1) % cfg.eval.interval == 0 or finished:
                # fp32 inference, as torchvision's references: anchors cast to a 16-bit box
                # regression dtype would lose whole pixels in the decoded boxes.
                evaluator = CocoEvaluator(val_set.coco, val_set.label_to_category_id)
                summary = evaluate(model_without_ddp, val_loader, evaluator, device, None, is_main=is_main)
                record.update({name: summary[name] for name in STAT_NAMES if name in summary})
            if is_main:
                metrics_writer(record)
                line = f"epoch {epoch}: loss {stats.get('loss', float('nan')):.4f}, {stats['images_per_s']:.1f} img/s"
                if "AP" in summary and "AP" in record:
                    line += f", val AP {summary['AP']:.4f} AP50 {summary['AP50']:.4f}"
                    if summary["AP"] > best_ap:
                        best_ap = summary["AP"]
                        save_checkpoint(out_dir / "best.pth", state(epoch + 1))
                print(line)
                save_checkpoint(out_dir / "last.pth", state(epoch + 1))
            epochs_done = epoch + 1
    except KeyboardInterrupt:
        if is_main:
            save_checkpoint(out_dir / "interrupted.pth", state(epochs_done))
            print(f"interrupted: saved {out_dir / 'interrupted.pth'} at step {scheduler.last_epoch}; --resume "
                  f"with it restarts epoch {epochs_done}", file=sys.stderr)
        raise
    except FloatingPointError as exc:
        # One line, and last.pth stays the last good epoch: nothing is saved after a bad step.
        print(f"error: {exc}", file=sys.stderr)
        return 1

    # ---- plots and summary
    if is_main:
        written = plot_training_curves(out_dir / "metrics.jsonl", out_dir)
        if evaluator is not None:
            written += write_plots(evaluator, out_dir)
            written.append(evaluator.write_results(out_dir / "results.json"))
        minutes = (time.perf_counter() - start_time) / 60
        print(f"\ndone: {scheduler.last_epoch} iterations, {minutes:.1f} min; best val AP {best_ap:.4f}")
        if summary:
            print(format_summary(summary))
            with open(out_dir / "metrics.json", "w", encoding="utf-8") as handle:
                json.dump(summary, handle, indent=1)
            written.append(out_dir / "metrics.json")
        print("wrote: " + ", ".join(str(path) for path in [out_dir / "last.pth", *written]))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
