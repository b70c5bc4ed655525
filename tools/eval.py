"""Evaluate a checkpoint on COCO-format data: ``python tools/eval.py CHECKPOINT [CONFIG] [--set ...]``.

The config comes from the checkpoint unless CONFIG is given; ``--set`` applies on top of either,
e.g. to evaluate on other data:

    python tools/eval.py runs/shapes_retinanet_r18/best.pth
    python tools/eval.py best.pth --set data.val.images=coco/val2017 \
        data.val.annotations=coco/annotations/instances_val2017.json

Only the model's categories are evaluated (those it was trained on). Prints the COCO table and
the per-class AP; writes OUT/metrics.json (12 stats + per-class AP), OUT/results.json (COCO
results) and the PR-curve and per-class plots. OUT is ``--out-dir``, default
``<checkpoint folder>/eval``.
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
from typing import Sequence

import torch
from torch.utils.data import DataLoader

import detfocal.modeling.retinanet  # noqa: F401  (registers the built-in backbones, heads and detectors)
from detfocal.engine.checkpoint import load_checkpoint
from detfocal.cli import run_cli
from detfocal.config import config_from_dict, data_paths, dataset_kwargs, load_config, model_kwargs
from detfocal.data import CocoDetection, build_transforms, collate_fn
from detfocal.engine.train import evaluate, format_summary
from detfocal.evaluation.coco import CocoEvaluator, write_plots
from detfocal.registry import DETECTORS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a .pth written by tools/train.py")
    parser.add_argument("config", nargs="?", help="YAML config (default: the one stored in the checkpoint)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. data.val.images=... data.val.annotations=...")
    parser.add_argument("--out-dir", type=Path, help="output folder (default: <checkpoint folder>/eval)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    checkpoint = load_checkpoint(args.checkpoint)
    missing = [key for key in ("model", "config", "num_classes", "label_to_category_id") if key not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint {args.checkpoint} has no {missing}; is it a tools/train.py checkpoint?")
    cfg = load_config(args.config, args.set) if args.config else config_from_dict(checkpoint["config"], args.set)
    out_dir = args.out_dir or args.checkpoint.parent / "eval"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # The model's own categories, so its labels and the ground truth's ids line up.
    label_to_category_id = list(checkpoint["label_to_category_id"])
    images, annotations = data_paths(cfg.data)["val"]
    kwargs = dataset_kwargs(cfg, images, annotations) | {"categories": label_to_category_id}
    dataset = CocoDetection(**kwargs, transforms=build_transforms(train=False))
    loader = DataLoader(dataset, batch_size=cfg.eval.batch_size, num_workers=cfg.data.workers, collate_fn=collate_fn)

    # The weights come from the checkpoint: never download a backbone for them.
    model = DETECTORS.get(cfg.model.type)(**model_kwargs(cfg, checkpoint["num_classes"]) | {"weights_backbone": None})
    model.load_state_dict(checkpoint["model"])
    model.to(device)
    print(f"evaluating {args.checkpoint} (epoch {checkpoint.get('epoch')}, step {checkpoint.get('global_step')}) "
          f"on {len(dataset)} images of {annotations}, {len(label_to_category_id)} categories")

    evaluator = CocoEvaluator(dataset.coco, label_to_category_id)
    summary = evaluate(model, loader, evaluator, device, None)
    print(format_summary(summary))

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.json", "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    written = [out_dir / "metrics.json", evaluator.write_results(out_dir / "results.json"), *write_plots(evaluator, out_dir)]
    print("wrote: " + ", ".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
