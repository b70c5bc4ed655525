"""The console commands: ``detfocal train|eval|infer|export|analyze|subset|shapes|benchmark|ablate|study|plot-focal``.

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
        loss or gradient, 2 for a user error, 128 + the signal's number for a stop signal
        (130 for Ctrl-C, 143 for SIGTERM, 138 for SIGUSR1).
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
    except KeyboardInterrupt as exc:
        print(f"interrupted{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 130))


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
    from detfocal.config import config_to_dict, config_to_yaml, load_config

    _import_modules(args.imports)
    if args.print_config:
        from detfocal.modeling.validate import check_model_config

        cfg = load_config(args.config, args.set)
        check_model_config(config_to_dict(cfg)["model"], imports=cfg.imports)  # what training checks first
        print(config_to_yaml(cfg), end="")
        return 0
    from detfocal.engine.train import train
    from detfocal.evaluation.summary import format_summary

    callbacks = [load_callback(spec) for spec in args.callbacks]
    resume = None if args.resume is None else (args.resume or True)
    summary = train(args.config, args.output_dir, resume, overrides=args.set, overwrite=args.overwrite,
                    callbacks=callbacks)
    if "AP" in summary:
        print(format_summary(summary))
    return 0


def load_callback(spec: str) -> object:
    """``module:Name`` -> an instance: ``Name`` is instantiated without arguments if it is a class.

    The module is found like ``--import`` finds one (the working directory comes first).

    Raises:
        ValueError: the spec is malformed, the module cannot be imported or has no such name.
    """
    module_name, _, name = spec.partition(":")
    if not module_name or not name.isidentifier():
        raise ValueError(f"--callback {spec!r}: expected MODULE:NAME, e.g. my_tracker:MlflowCallback")
    from detfocal.config import import_modules

    import_modules([module_name])
    value = getattr(sys.modules[module_name], name, None)
    if value is None:
        raise ValueError(f"--callback {spec!r}: module {module_name!r} has no {name!r}")
    return value() if isinstance(value, type) else value


def _eval(args: argparse.Namespace) -> int:
    from detfocal.engine.evaluate import evaluate_checkpoint
    from detfocal.evaluation.summary import format_summary

    _import_modules(args.imports)
    summary = evaluate_checkpoint(args.checkpoint, args.config, overrides=args.set, out_dir=args.out_dir)
    print(format_summary(summary))
    return 0


def _infer(args: argparse.Namespace) -> int:
    from detfocal.engine.predict import predict_images

    _import_modules(args.imports)
    results = predict_images(args.checkpoint, args.images, args.out, score_thresh=args.score_thresh,
                             min_draw_size=args.min_draw_size, overwrite=args.overwrite)
    for result in results:
        found = ", ".join(sorted(set(result["names"]))) or "nothing"
        print(f"{result['image']}: {len(result['boxes'])} detections ({found}) -> {result['output']}")
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


def _analyze(args: argparse.Namespace) -> int:
    from detfocal.engine.checkpoint import load_checkpoint
    from detfocal.engine.loading import load_model
    from detfocal.evaluation.analysis_plots import check_outputs, format_table, summary_sentences, write_model_analysis

    _import_modules(args.imports)
    if args.images < 1:
        raise ValueError(f"--images must be at least 1, got {args.images}")
    state = load_checkpoint(args.checkpoint)  # a missing checkpoint fails before any folder is made
    out = check_outputs(args.out if args.out is not None else args.checkpoint.parent / "analysis", args.overwrite)
    model, info = load_model(state, args.config, overrides=args.set, source=str(args.checkpoint))
    metadata = {"checkpoint": str(args.checkpoint), "iteration": info["iteration"]}
    summary, paths = write_model_analysis(model, info["config"], out, label_to_category_id=info["label_to_category_id"],
                                          split=args.split, num_images=args.images, overwrite=args.overwrite,
                                          generate_data=args.config is not None, metadata=metadata)
    print(format_table(summary))
    print("\n".join(summary_sentences(summary)))
    print(f"wrote {', '.join(path.name for path in paths)} to {out}")
    return 0


def _subset(args: argparse.Namespace) -> int:
    from detfocal.data.subset import check_output_path, make_subset, summarize_subset
    from detfocal.utils.io import write_json_atomic

    def split(text: str) -> list[str]:
        return [item.strip() for item in text.split(",") if item.strip()]

    check_output_path(args.out, [args.annotations])
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"--out {args.out} exists; add --overwrite to replace it")
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
                                           "(see 'detfocal ablate --help')"),
             "study": ("detfocal.study", "train CE against FL from 10^2 to 10^4 negatives per positive: "
                                         "'detfocal study imbalance' (see 'detfocal study --help')")}


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
                     help="continue from CKPT (no value: whichever of OUTPUT_DIR/interrupted.pth and last.pth holds "
                          "more iterations)")
    sub.add_argument("--overwrite", action="store_true", help="replace the run already in the output folder")
    sub.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    sub.add_argument("--callback", dest="callbacks", nargs="+", action="extend", default=[], metavar="MODULE:NAME",
                     help="add a callback (a class, instantiated without arguments, or an object) with any of the "
                          "events on_run_start, on_step_end, on_evaluation_end, on_epoch_end, on_checkpoint, "
                          "on_run_end; see the callbacks how-to")

    sub = command("eval", _eval, "COCO-evaluate a checkpoint on its val split")
    sub.add_argument("checkpoint", type=Path, help="a .pth written by detfocal train")
    sub.add_argument("config", nargs="?", help="YAML config (default: the one stored in the checkpoint)")
    _overrides(sub)
    sub.add_argument("--out-dir", type=Path, help="output folder (default: <checkpoint folder>/eval)")

    sub = command("infer", _infer, "draw a checkpoint's detections on images")
    sub.add_argument("checkpoint", type=Path, help="a .pth written by detfocal train")
    sub.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG or JPEG files (8 or 16 bit)")
    sub.add_argument("--out", type=Path, required=True,
                     help="folder for the drawn PNGs, named after the images (never an input image)")
    sub.add_argument("--overwrite", action="store_true", help="replace existing files in --out (never an input)")
    sub.add_argument("--score-thresh", type=float, default=0.5, help="lowest score drawn (default 0.5)")
    sub.add_argument("--min-draw-size", type=int, default=512, metavar="PX",
                     help="enlarge smaller images by a whole factor until their longer side reaches PX before "
                          "drawing, so labels stay readable (default 512, at most 4096; 0: input size)")
    _imports(sub)

    sub = command("export", _export, "export a checkpoint's detector (NMS included) to ONNX")
    sub.add_argument("checkpoint", type=Path, help="a .pth written by detfocal train")
    sub.add_argument("--format", choices=["onnx"], default="onnx", help="the only format: onnx")
    sub.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    sub.add_argument("--image-size", type=int, metavar="PX",
                     help="fix the input to PX x PX, at most 4096 (default: any size)")
    sub.add_argument("--opset", type=int, default=17, help="ONNX opset, 11-20 (default 17)")
    sub.add_argument("--score-thresh", type=float, help="lowest score kept (default: the checkpoint's)")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _imports(sub)

    sub = command("analyze", _analyze, "a checkpoint's per-anchor losses at gamma 0-2: the paper's Figure 4, loss "
                                       "shares, gradient norms")
    sub.add_argument("checkpoint", type=Path, help="a .pth written by detfocal train")
    sub.add_argument("config", nargs="?", help="YAML config (default: the one stored in the checkpoint)")
    _overrides(sub)
    sub.add_argument("--split", choices=["val", "train"], default="val",
                     help="the images analysed, without augmentation (default val)")
    sub.add_argument("--images", type=int, default=200, metavar="N",
                     help="analyse the first N images of the split (default 200)")
    sub.add_argument("--out", type=Path, help="output folder (default: <checkpoint folder>/analysis)")
    sub.add_argument("--overwrite", action="store_true", help="replace the files of an earlier analysis in --out")

    sub = command("subset", _subset, "write a subset of a COCO annotation file")
    sub.add_argument("annotations", help="COCO instances json")
    sub.add_argument("--categories", help="comma-separated category names or ids, e.g. person,dog or 1,18")
    sub.add_argument("--max-images", type=int, help="keep at most this many images (seeded sample)")
    sub.add_argument("--image-ids", help="comma-separated image ids to keep")
    sub.add_argument("--min-annotations", type=int, default=0,
                     help="keep only images with at least this many non-crowd boxes of the kept categories")
    sub.add_argument("--seed", type=int, default=0, help="seed of the --max-images sample")
    sub.add_argument("--out", required=True, help="output json path (never the input)")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    sub = command("shapes", _shapes, "generate the embedded shapes dataset (COCO format)")
    sub.add_argument("--out", default="data/shapes", help="output folder (default: data/shapes)")
    # The ranges are those of detfocal.data.shapes.generate, which checks them before any work.
    sub.add_argument("--num-train", type=int, help="number of training images, 0 to 100000 (default 1500)")
    sub.add_argument("--num-val", type=int, help="number of validation images, 0 to 100000 (default 200)")
    sub.add_argument("--image-size", type=int, help="image width and height in pixels, 32 to 4096 (default 128)")
    sub.add_argument("--max-objects", type=int, help="most objects per image, 1 to 100 (default 6)")
    sub.add_argument("--min-object-size", type=int,
                     help="smallest object diameter in pixels, 4 to IMAGE_SIZE / 2 (default 8)")
    sub.add_argument("--seed", type=int, default=0, help="generator seed in [0, 2**32) (default 0)")
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
    # starves the work (a training step many times slower). Passive waiting costs little on an
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
