"""The console commands: ``detfocal train|eval|infer|export|subset|shapes|benchmark|ablate|plot-focal``.

``detfocal --help`` answers without importing torch: each command's parser is built here
from the standard library alone, and the work is imported only when a command runs. User
mistakes (a bad path, key or value) become one line on stderr and exit code 2; a traceback
is for bugs only. ``tools/*.py`` and ``python -m detfocal`` call :func:`main` too.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

# Errors a user can cause: a bad path, config key or value, an unwritable folder, a full disk.
# Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, KeyError, OSError)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; print a user error as ``error: ...`` on one line and return 2.

    Returns:
        The process exit code: ``main``'s return value (0 for None), 1 for a non-finite
        loss or gradient, 2 for a user error, 130 for Ctrl-C.
    """
    try:
        return int(main(argv) or 0)
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _imports(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--import", dest="imports", nargs="+", action="extend", default=[], metavar="MODULE",
                        help="import these modules first (they register custom heads, backbones or detectors)")


def _overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, each value parsed as YAML: train.lr=0.02 "
                             "data.subset.categories=[person,dog]")
    _imports(parser)


def _import_modules(names: Sequence[str]) -> None:
    if names:
        from detfocal.config import import_modules

        import_modules(names)


# ----------------------------------------------------------------------------------------------
# The commands: each takes the parsed arguments and returns an exit code.


def _train(args: argparse.Namespace) -> int:
    from detfocal.config import config_to_yaml, load_config

    _import_modules(args.imports)
    if args.print_config:
        print(config_to_yaml(load_config(args.config, args.set)), end="")
        return 0
    from detfocal.engine.train import train

    resume = None if args.resume is None else (args.resume or True)
    train(args.config, args.output_dir, resume, overrides=args.set, overwrite=args.overwrite)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from detfocal.engine.inference import evaluate_checkpoint

    _import_modules(args.imports)
    evaluate_checkpoint(args.checkpoint, args.config, overrides=args.set, out_dir=args.out_dir)
    return 0


def _infer(args: argparse.Namespace) -> int:
    from detfocal.engine.inference import predict_images

    _import_modules(args.imports)
    predict_images(args.checkpoint, args.images, args.out, score_thresh=args.score_thresh,
                   min_draw_size=args.min_draw_size)
    return 0


def _export(args: argparse.Namespace) -> int:
    from detfocal.engine.export import export_onnx

    _import_modules(args.imports)
    try:
        path = export_onnx(args.checkpoint, args.out, image_size=args.image_size, opset=args.opset,
                           score_thresh=args.score_thresh, overwrite=args.overwrite)
    except ImportError as exc:  # onnx is an optional extra: a setup problem, not a bug
        raise ValueError(str(exc)) from None
    size = "H, W" if args.image_size is None else f"{args.image_size}, {args.image_size}"
    print(f"exported {args.checkpoint} to {path} (ONNX opset {args.opset}; input image float32 [3, {size}] RGB in "
          f"[0, 1]; outputs boxes, scores, labels after NMS)")
    return 0


def _subset(args: argparse.Namespace) -> int:
    from detfocal.data.subset import check_output_path, make_subset, summarize_subset
    from detfocal.utils.io import write_json_atomic

    def split(text: str) -> list[str]:
        return [item.strip() for item in text.split(",") if item.strip()]

    check_output_path(args.out, [args.annotations])
    # Digits are category ids; anything else is a name (COCO names are never numbers).
    categories = None if args.categories is None else [int(c) if c.isdigit() else c for c in split(args.categories)]
    image_ids = None
    if args.image_ids is not None:
        try:
            image_ids = [int(item) for item in split(args.image_ids)]
        except ValueError:
            raise ValueError(f"--image-ids: expected comma-separated integers, got {args.image_ids!r}") from None
    subset = make_subset(args.annotations, categories=categories, max_images=args.max_images, image_ids=image_ids,
                         min_annotations=args.min_annotations, seed=args.seed)
    print(f"{write_json_atomic(args.out, subset)}: {summarize_subset(subset)}")
    return 0


def _shapes(args: argparse.Namespace) -> int:
    import json

    from detfocal.data import shapes

    options = {name: getattr(args, name) for name in ("num_train", "num_val", "image_size", "max_objects",
                                                      "min_object_size") if getattr(args, name) is not None}
    paths = shapes.generate(args.out, seed=args.seed, progress=not args.no_progress, **options)
    for split in ("train", "val"):
        with open(paths[f"{split}_annotations"], encoding="utf-8") as handle:
            dataset = json.load(handle)
        print(f"{split}: {len(dataset['images'])} images, {len(dataset['annotations'])} annotations "
              f"in {paths[f'{split}_images']}, {paths[f'{split}_annotations']}")
    return 0


def _plot_focal(args: argparse.Namespace) -> int:
    from detfocal.evaluation.plots import write_figures

    for path in write_figures(args.out):
        print(path)
    return 0


# Commands with a parser of their own: they get the rest of the command line as it is.
FORWARDED = {"benchmark": ("detfocal.benchmark", "time the loss, head, training step and COCO evaluation against "
                                                 "torchvision (see 'detfocal benchmark --help')"),
             "ablate": ("detfocal.ablate", "train over a grid of settings and write the paper's Table 1 for them "
                                           "(see 'detfocal ablate --help')")}


# ----------------------------------------------------------------------------------------------
# The parser


def build_parser() -> argparse.ArgumentParser:
    """The ``detfocal`` parser with one subcommand per tool (standard library only)."""
    parser = argparse.ArgumentParser(prog="detfocal", description="Focal-loss RetinaNet training, evaluation and tools.")
    parser.add_argument("--version", action="version", version=f"detfocal {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help_text: str,
                **kwargs) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, **kwargs)
        sub.set_defaults(handler=handler)
        return sub

    sub = command("train", _train, "train a detector from a YAML config")
    sub.add_argument("config", help="YAML config, e.g. configs/shapes_retinanet_r18.yaml")
    _overrides(sub)
    sub.add_argument("--output-dir", type=Path, help="run folder (default: runs/<config name>)")
    sub.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                     help="continue from CKPT (no value: the newer of OUTPUT_DIR/interrupted.pth and last.pth)")
    sub.add_argument("--overwrite", action="store_true", help="replace the run already in the output folder")
    sub.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    sub = command("eval", _eval, "COCO-evaluate a checkpoint on its val split")
    sub.add_argument("checkpoint", type=Path, help="a .pth written by detfocal train")
    sub.add_argument("config", nargs="?", help="YAML config (default: the one stored in the checkpoint)")
    _overrides(sub)
    sub.add_argument("--out-dir", type=Path, help="output folder (default: <checkpoint folder>/eval)")

    sub = command("infer", _infer, "draw a checkpoint's detections on images")
    sub.add_argument("checkpoint", type=Path, help="a .pth written by detfocal train")
    sub.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG or JPEG files (8 or 16 bit)")
    sub.add_argument("--out", type=Path, required=True, help="folder for the drawn PNGs")
    sub.add_argument("--score-thresh", type=float, default=0.5, help="lowest score drawn (default 0.5)")
    sub.add_argument("--min-draw-size", type=int, default=512, metavar="PX",
                     help="enlarge smaller images by a whole factor until their longer side reaches PX before "
                          "drawing, so labels stay readable (default 512, at most 4096; 0: input size)")
    _imports(sub)

    sub = command("export", _export, "export a checkpoint's detector (NMS included) to ONNX")
    sub.add_argument("checkpoint", type=Path, help="a .pth written by detfocal train")
    sub.add_argument("--format", choices=["onnx"], default="onnx", help="the only format: onnx")
    sub.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    sub.add_argument("--image-size", type=int, metavar="PX", help="fix the input to PX x PX (default: any size)")
    sub.add_argument("--opset", type=int, default=17, help="ONNX opset, 11-20 (default 17)")
    sub.add_argument("--score-thresh", type=float, help="lowest score kept (default: the checkpoint's)")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _imports(sub)

    sub = command("subset", _subset, "write a subset of a COCO annotation file")
    sub.add_argument("annotations", help="COCO instances json")
    sub.add_argument("--categories", help="comma-separated category names or ids, e.g. person,dog or 1,18")
    sub.add_argument("--max-images", type=int, help="keep at most this many images (seeded sample)")
    sub.add_argument("--image-ids", help="comma-separated image ids to keep")
    sub.add_argument("--min-annotations", type=int, default=0,
                     help="keep only images with at least this many non-crowd boxes of the kept categories")
    sub.add_argument("--seed", type=int, default=0, help="seed of the --max-images sample")
    sub.add_argument("--out", required=True, help="output json path (never the input)")

    sub = command("shapes", _shapes, "generate the embedded shapes dataset (COCO format)")
    sub.add_argument("--out", default="data/shapes", help="output folder (default: data/shapes)")
    sub.add_argument("--num-train", type=int, help="number of training images")
    sub.add_argument("--num-val", type=int, help="number of validation images")
    sub.add_argument("--image-size", type=int, help="image width and height in pixels")
    sub.add_argument("--max-objects", type=int, help="most objects per image")
    sub.add_argument("--min-object-size", type=int, help="smallest object diameter in pixels")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    sub = command("plot-focal", _plot_focal, "draw the focal-loss figures (PNG and SVG)")
    sub.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")

    for name, (_, help_text) in FORWARDED.items():  # listed in --help; main() hands them their arguments
        command(name, lambda args: 0, help_text)
    return parser


def _version() -> str:
    from detfocal import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``detfocal`` console script; returns the exit code."""
    # libgomp's threads spin while they wait; when other processes share the cores the spinning
    # starves the work (a training step measured 8x slower). Passive waiting costs little on an
    # idle machine. Set before torch starts its thread pool; the environment's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    from detfocal.utils.logger import setup_logging

    setup_logging()
    if argv and argv[0] in FORWARDED:
        import importlib

        module = importlib.import_module(FORWARDED[argv[0]][0])
        return run_cli(module.main, argv[1:])
    args = build_parser().parse_args(argv)
    return run_cli(lambda _: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
