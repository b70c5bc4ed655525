"""Benchmark detfocal's focal loss, head and training step against torchvision.

Each case runs in its own subprocess, so its peak memory is its own. Prints markdown
tables and writes JSON. Uses only the standard library, torch and torchvision (plus
detfocal itself).

    detfocal benchmark                 # all cases, full size (~12 min on 2 cores)
    detfocal benchmark --quick         # smaller inputs, under 2 minutes
    detfocal benchmark --cases loss,scaling --json out.json
    detfocal benchmark --cases gpu --json gpu_check.json   # the GPU check, alone (< 8 min on one GPU)

Cases:
    loss      focal loss forward+backward at COCO scale: B=2, N=anchors of 800x1333 (P3-P7, 9 per
              location), C=80, ~100 positives and 1% ignored per image.
    scaling   the compiled loss at N/4, N, 4N and C = 20, 80, 365; fitted exponent of time vs N*C.
    train     RetinaNet training-step images/s: torchvision's stock RetinaNet against detfocal's, the
              same architecture and weights; R18 256 px batch 8, R50 512 px batch 2 and the demo's
              model; fp32, plus train.amp: auto's choice where that is not fp32.
    eval      COCO evaluation time on the real 100-image sample in tests/data (skipped without it): pycocotools against
              faster-coco-eval, each loading, evaluating, accumulating and summarizing.
    inference the demo's evaluation (200 val images; --checkpoint for a trained model) by component:
              data, transform, backbone + FPN, head, anchors, post-processing (per-level top-k,
              batched_nms), box rescale, COCO evaluation; images/s.
    profile   the demo's training step (configs/shapes_retinanet_r18.yaml: R18 from scratch, FPN 64,
              GN heads, 128 px, batch 8, on CPU) under torch.profiler, split by component: data,
              backbone, FPN, head convs, anchors, matching, target encoding, losses, optimizer.
              2 warm-up steps, then --repeats profiled steps (mean); --quick: batch 2, 3 steps.
              Also torchvision's stock RetinaNet of the same architecture (the "before").
    gpu       the one-shot check of the CUDA path, run alone (docs/how-to/gpu-check.md): pytest -m cuda,
              the loss in fp32/fp16/bf16 (compiled, eager, torchvision's head, one sigmoid pass), the demo's
              step against torchvision's, 200 demo iterations with train.amp auto and bf16, a two-process
              NCCL run on 2 GPUs; one table with the targets. Refuses without CUDA; --device cpu --quick is
              its dry run on the CPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple, Sequence

__all__ = ["CASES", "DefaultInputs", "build_specs", "default_inputs", "main", "parse_args"]

logger = logging.getLogger(__name__)

CASES = ("loss", "scaling", "train", "eval", "inference", "profile")
GPU_CASE = "gpu"  # not among the default cases: it needs a GPU, and runs alone


class DefaultInputs(NamedTuple):
    config: Path  # the demo's config: the train case's last row, the inference and profile cases
    coco_sample_dirs: tuple[Path, ...]  # folders tried, in order, for the eval case's 100-image COCO sample


def default_inputs() -> DefaultInputs:
    """Where the benchmark finds the inputs the user did not name (``--config``, ``--coco-sample``).

    The one place that knows where they live: the demo config ships with the package; the
    COCO sample is the test data of a source checkout (next to the package, or in the
    working directory), and a wheel install runs without it.
    """
    from detfocal.configs import CONFIG_DIR

    checkout = Path(__file__).resolve().parents[2]  # a source checkout's root (a wheel has none)
    return DefaultInputs(config=CONFIG_DIR / "shapes_retinanet_r18.yaml",
                         coco_sample_dirs=(checkout / "tests" / "data", Path("tests/data")))


def _existing_file(path: Path, argument: str, hint: str) -> Path:
    if path.is_dir():
        raise ValueError(f"{argument}: {path} is a folder, expected a file; {hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: {path} does not exist; {hint}")
    return path


def build_specs(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """The cases to run, by name: one spec dict per table row (see ``runner.worker``).

    Raises:
        FileNotFoundError, ValueError: a config, checkpoint or COCO sample that is missing or a folder.
    """
    from .loss import coco_num_anchors

    quick = args.quick
    n = coco_num_anchors() // (8 if quick else 1)
    repeats = 3 if quick else args.repeats
    common = {"device": args.device, "threads": args.threads}
    defaults = default_inputs()
    specs: dict[str, list[dict[str, Any]]] = {}
    config = None
    if {"train", "inference", "profile"} & set(args.cases):
        from detfocal.config import load_config

        path = _existing_file(Path(args.config or defaults.config), "--config",
                              "name the config of the train, inference and profile cases (the demo's is "
                              "configs/shapes_retinanet_r18.yaml in the repository)")
        config = load_config(path)
    if "loss" in args.cases:
        impls = ["detfocal_head", "detfocal_head_fp16", "detfocal_compiled", "detfocal_eager", "torchvision_head",
                 "detfocal_float", "torchvision_ops_float", "sigmoid_pass"]
        specs["loss"] = [{**common, "kind": "loss", "impl": impl, "batch": 2, "num_anchors": n, "num_classes": 80,
                          "repeats": repeats} for impl in impls]
    if "scaling" in args.cases:
        sizes = [(n // 4, 80), (n, 80), (4 * n, 80), (n, 20), (n, 365)]
        if quick:
            sizes = [(n // 4, 80), (n, 80), (n, 20)]
        specs["scaling"] = [{**common, "kind": "loss", "impl": "detfocal_compiled", "batch": 2, "num_anchors": na,
                             "num_classes": c, "repeats": repeats} for na, c in sizes]
    if "train" in args.cases:
        import torch

        from detfocal.engine.precision import resolve_amp

        demo = {"config": str(path), "model": path.name, "size": config.model.min_size,
                "batch": config.train.batch_size}
        settings = [demo] if quick else [{"backbone": "resnet18", "size": 256, "batch": 8},
                                         {"backbone": "resnet50", "size": 512, "batch": 2}, demo]
        # "default" runs only where train.amp: auto picks something other than fp32.
        precisions = ["fp32"]
        if resolve_amp("auto", torch.device(args.device))[0] is not None:
            precisions.append("default")
        specs["train"] = [{**common, "kind": "train", **setting, "impl": impl, "precision": precision,
                           "repeats": 2 if quick else 5}
                          for setting in settings for precision in precisions
                          for impl in ("torchvision", "detfocal")]
    if "eval" in args.cases:
        candidates = [args.coco_sample] if args.coco_sample else defaults.coco_sample_dirs
        data_dir = next((Path(d) for d in candidates if (Path(d) / "instances_val2014_100.json").is_file()), None)
        if data_dir is None and args.coco_sample is not None:
            raise ValueError(f"--coco-sample: no instances_val2014_100.json in {args.coco_sample}; "
                             f"name the folder of the 100-image COCO sample")
        if data_dir is None:  # a wheel install has no checkout next to it: the other cases still run
            logger.warning("skipped the eval case: no 100-image COCO sample in %s (a source checkout has one in "
                           "tests/data); pass --coco-sample DIR to run it", ", ".join(str(d) for d in candidates))
        else:
            specs["eval"] = [{**common, "kind": "eval", "impl": backend, "data_dir": str(data_dir),
                              "repeats": repeats} for backend in ("pycocotools", "faster_coco_eval")]
    if "inference" in args.cases:
        if args.checkpoint is not None:
            _existing_file(args.checkpoint, "--checkpoint", "name a detfocal checkpoint, e.g. "
                                                            "runs/shapes_retinanet_r18/best.pth after the demo")
        specs["inference"] = [{**common, "kind": "inference", "config": str(path),
                               "model": args.checkpoint.name if args.checkpoint else "untrained",
                               "repeats": 2 if quick else 3,
                               "num_images": 48 if quick else 200,
                               "checkpoint": str(args.checkpoint) if args.checkpoint else None}]
    if "profile" in args.cases:
        batch = 2 if quick else config.train.batch_size
        # torchvision's stock RetinaNet of the same architecture is the "before" of the breakdown.
        specs["profile"] = [{**common, "kind": "profile", "config": str(path), "batch": batch, "impl": impl,
                             "repeats": 3 if quick else args.repeats}
                            for impl in (("detfocal",) if quick else ("torchvision", "detfocal"))]
    return specs


def build_parser() -> argparse.ArgumentParser:
    """The ``detfocal benchmark`` parser (standard library only)."""
    parser = argparse.ArgumentParser(prog="detfocal benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats (< 2 min)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of cases (default: all of them), or {GPU_CASE} alone")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per case, at least 1 (default 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per case, at least 1 (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed per case")
    parser.add_argument("--coco-sample", type=Path, default=None,
                        help="folder with instances_val2014_100.json and the fake results (eval case)")
    parser.add_argument("--config", type=Path, default=None,
                        help="config of the train case's last row and of the inference and profile cases "
                             "(default: the demo's)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="inference case: a trained checkpoint (default: an untrained demo model)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line before any work (and before torch is imported).

    Raises:
        ValueError: a bound is violated (``--repeats`` >= 1, ``--threads`` >= 1,
            ``--timeout`` > 0), an unknown case or device, or a ``--json`` path that cannot
            be written; one line naming the option, the value and what was expected.
    """
    args = build_parser().parse_args(argv)
    if args.worker:
        return args
    if args.repeats < 1:
        raise ValueError(f"--repeats: expected an int >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: expected an int >= 1, got {args.threads}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout: expected seconds > 0, got {args.timeout}")
    if args.device not in (None, "cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda, got {args.device!r}")
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - set(CASES) - {GPU_CASE}
    if unknown or not args.cases:
        raise ValueError(f"--cases: unknown or no case(s) {sorted(unknown)}; expected some of {', '.join(CASES)}, "
                         f"or {GPU_CASE} alone")
    if GPU_CASE in args.cases:
        if args.cases != [GPU_CASE]:
            raise ValueError(f"--cases: {GPU_CASE} runs alone (its steps run the other cases it needs), got "
                             f"{','.join(args.cases)}")
        if args.device == "cpu" and not args.quick:
            raise ValueError("--cases gpu --device cpu is the dry run of the GPU check: add --quick")
    if args.json is not None:  # checked now, not after minutes of timing
        if args.json.is_dir():
            raise ValueError(f"--json {args.json} is a folder, expected a file")
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=args.json.parent).close()
        except OSError as exc:
            raise ValueError(f"--json {args.json} cannot be written: {exc.strerror or exc}") from None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``detfocal benchmark``: run the cases, print the report, and write ``--json``; returns the exit code."""
    args = parse_args(argv)
    if args.worker:
        from .runner import worker

        worker(json.loads(args.worker), send=lambda line: print(line, flush=True))  # read by runner.run_cases
        return 0
    import torch

    from detfocal.utils.io import atomic_write

    from .report import report
    from .runner import run_cases

    if args.cases == [GPU_CASE]:
        return _gpu_check(args)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    machine = _machine(args.device)
    print(f"detfocal benchmark: {machine}{' (quick)' if args.quick else ''}", flush=True)
    specs = [{**spec, "case": name} for name, group in build_specs(args).items() for spec in group]
    if args.quick:
        loss_specs = [spec for spec in specs if spec["kind"] == "loss"]
        other_specs = [spec for spec in specs if spec["kind"] != "loss"]
        batches = [batch for batch in (loss_specs, other_specs) if batch]
    else:
        batches = [[spec] for spec in specs]
    results: dict[str, list[dict[str, Any]]] = {}
    for batch in batches:
        for result in run_cases(batch, args.timeout):
            results.setdefault(result["case"], []).append(result)
    print()
    print(report(results))
    if args.json:
        payload = json.dumps({"machine": machine, "quick": args.quick, "results": results}, indent=2)
        print(f"wrote {atomic_write(args.json, lambda handle: handle.write(payload), binary=False)}")
    return 0


def _machine(device: str) -> str:
    """The CPU (model, vector extensions, cores), torch's version and the device: every report names them."""
    import torch

    from detfocal.engine.precision import cpu_description

    gpus = ""
    if device == "cuda":
        gpus = f" ({torch.cuda.get_device_name()}; {torch.cuda.device_count()} device(s), CUDA {torch.version.cuda})"
    return f"{cpu_description()}, {os.cpu_count()} cores, torch {torch.__version__}, device {device}{gpus}"


def _gpu_check(args: argparse.Namespace) -> int:
    """``--cases gpu``: the GPU check (:mod:`.gpu`); the table on stdout, the JSON after every step.

    Returns:
        0, or 1 where a row failed or missed its target.
    """
    from detfocal.utils.io import atomic_write

    from .gpu import check_device, run_gpu_check
    from .gpu_report import gpu_table

    device = check_device(args.device, args.quick)
    config = _existing_file(Path(args.config or default_inputs().config), "--config",
                            "name the demo config (configs/shapes_retinanet_r18.yaml in the repository)")
    machine = _machine(device)
    print(f"detfocal GPU check: {machine}{' (dry run)' if device == 'cpu' else ''}", flush=True)

    def write(details: dict[str, Any]) -> None:
        if args.json:
            payload = json.dumps({"machine": machine, "quick": args.quick, "device": device,
                                  "table": gpu_table(details), "results": {GPU_CASE: details}}, indent=2)
            atomic_write(args.json, lambda handle: handle.write(payload), binary=False)

    details = run_gpu_check(device=device, quick=args.quick, config=config, repeats=args.repeats, on_step=write)
    table = gpu_table(details)
    print()
    print(table)
    print(f"\nlogs and run folders: {details['work_dir']}")
    if args.json:
        print(f"wrote {args.json}")
    return 1 if any(row.endswith(("| FAILED |", "| MISS |")) for row in table.splitlines()) else 0
