"""Benchmark detfocal's focal loss, head and training step against torchvision.

Each case runs in its own subprocess, so its peak memory is its own. Prints markdown
tables and writes JSON. Uses only the standard library, torch and torchvision (plus
detfocal itself).

    detfocal benchmark                 # all cases, full size (~12 min on 2 cores)
    detfocal benchmark --quick         # smaller inputs, under 2 minutes
    detfocal benchmark --cases loss,scaling --json out.json

Cases:
    loss      focal loss forward+backward at COCO scale: B=2, N=anchors of 800x1333 (P3-P7, 9 per
              location), C=80, ~100 positives and 1% ignored per image.
    scaling   the compiled loss at N/4, N, 4N and C = 20, 80, 365; fitted exponent of time vs N*C.
    train     RetinaNet training-step images/s: torchvision's stock RetinaNet against detfocal's, the
              same architecture and weights; R18 256 px batch 8, R50 512 px batch 2 and the demo's
              model; fp32, plus train.amp: auto's choice where that is not fp32.
    eval      COCO evaluation time on the shared real sample (100 images): pycocotools against
              faster-coco-eval, each loading, evaluating, accumulating and summarizing.
    inference the demo's evaluation (200 val images; --checkpoint for a trained model) by component:
              data, transform, backbone + FPN, head, anchors, post-processing (per-level top-k,
              batched_nms), box rescale, COCO evaluation; images/s.
    profile   the demo's training step (configs/shapes_retinanet_r18.yaml: R18 from scratch, FPN 64,
              GN heads, 128 px, batch 8, on CPU) under torch.profiler, split by component: data,
              backbone, FPN, head convs, anchors, matching, target encoding, losses, optimizer.
              2 warm-up steps, then --repeats profiled steps (mean); --quick: batch 2, 3 steps.
              Also torchvision's stock RetinaNet of the same architecture (the "before").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from detfocal.cli import run_cli
from detfocal.engine.precision import cpu_description

from .evaluation import inference_table
from .loss import coco_num_anchors, fit_exponent, loss_table
from .profile import profile_table
from .timing import fmt
from .training import train_table

# Where the eval case finds the real 100-image COCO sample, relative to the working directory.
COCO_SAMPLE_DIRS = (Path("../shared/data/coco_val2014_100"), Path("tests/data"))


# The profile case's model, data and optimizer: the demo's.
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "shapes_retinanet_r18.yaml"


CASES = ("loss", "scaling", "train", "eval", "inference", "profile")


PROGRESS = "detfocal.benchmark.progress "
RESULT = "detfocal.benchmark.result "


def spec_label(name: str, spec: dict[str, Any]) -> str:
    """``"loss: detfocal_head"``-style name of a case for the progress lines."""
    return f"{name}: " + " ".join(str(spec[key]) for key in ("impl", "model", "backbone", "precision")
                                  if spec.get(key))


def worker(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run cases in this process (the subprocess side of :func:`run_cases`), one result each.

    Each case starts with a progress line and ends with a result line on stdout, so the
    parent keeps what finished if a later case crashes. A case that raises gives
    ``{"error": ...}`` and the next one still runs; the environment a case changes (the
    loss cases set ``DETFOCAL_COMPILE``) is restored after it.
    """
    import torch

    from .evaluation import eval_case, inference_case
    from .loss import loss_case
    from .profile import profile_case
    from .training import train_case

    cases = {"loss": loss_case, "train": train_case, "eval": eval_case, "inference": inference_case,
             "profile": profile_case}
    results = []
    for spec in specs:
        print(f"{PROGRESS}{spec_label(spec['case'], spec)}", flush=True)
        torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
        environment = dict(os.environ)
        try:
            if spec["kind"] not in cases:
                raise ValueError(f"unknown case kind {spec['kind']!r}")
            result = cases[spec["kind"]](spec)
        except Exception as exc:  # noqa: BLE001 - reported in the case's table row
            result = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            os.environ.clear()
            os.environ.update(environment)
        print(f"{RESULT}{json.dumps(result)}", flush=True)
        results.append(result)
    return results


def run_cases(specs: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    """Run ``specs`` in one fresh interpreter, printing a line per case with its seconds.

    Each case of a full run gets its own interpreter, so its peak memory is its own; ``--quick``
    runs its loss cases in one and the others in another, to pay the torch import (~6 s here)
    twice instead of once per case. ``timeout`` is per case.
    """
    # For the loss's memory figures, a fixed mmap threshold makes glibc return every large free
    # to the OS at once, so the sampled RSS follows live tensor memory instead of the
    # allocator's cache. The other cases run with the allocator a training run has.
    env = dict(os.environ)
    if all(spec["kind"] == "loss" for spec in specs):
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "detfocal.benchmark", "--worker", json.dumps(specs)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout * len(specs), kill)
        timer.start()
        started, start = False, time.perf_counter()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(PROGRESS):
                    print(f"  running {line[len(PROGRESS):].strip()}", end="", flush=True)
                    started, start = True, time.perf_counter()
                elif line.startswith(RESULT):
                    results.append(json.loads(line[len(RESULT):]))
                    print(f" ({time.perf_counter() - start:.0f} s)", flush=True)
                    started = False
            proc.wait()
        finally:
            timer.cancel()
        if started:
            print(" (failed)", flush=True)
        if len(results) < len(specs):
            stderr.seek(0)
            tail = (stderr.read().strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            error = f"timed out after {timeout * len(specs):.0f} s" if timed_out.is_set() else tail
            results += [{"error": error}] * (len(specs) - len(results))
    return [{**spec, **result} for spec, result in zip(specs, results)]


def build_specs(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    quick = args.quick
    n = coco_num_anchors() // (8 if quick else 1)
    repeats = 3 if quick else args.repeats
    common = {"device": args.device, "threads": args.threads}
    specs: dict[str, list[dict[str, Any]]] = {}
    config = None
    if {"train", "inference", "profile"} & set(args.cases):
        from detfocal.config import load_config

        path = Path(args.config or DEMO_CONFIG)
        if not path.is_file():
            raise FileNotFoundError(f"--config: {path} does not exist; name the config of the train, inference and "
                                    f"profile cases (the demo's is configs/shapes_retinanet_r18.yaml in the repository)")
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
        candidates = [args.coco_sample] if args.coco_sample else COCO_SAMPLE_DIRS
        data_dir = next((Path(d) for d in candidates if (Path(d) / "instances_val2014_100.json").is_file()), None)
        if data_dir is None:
            raise ValueError(f"--coco-sample: no instances_val2014_100.json in {[str(d) for d in candidates]}; "
                             f"name the folder of the 100-image COCO sample")
        specs["eval"] = [{**common, "kind": "eval", "impl": backend, "data_dir": str(data_dir), "repeats": repeats}
                         for backend in ("pycocotools", "faster_coco_eval")]
    if "inference" in args.cases:
        if args.checkpoint is not None and not args.checkpoint.is_file():
            raise FileNotFoundError(f"--checkpoint: {args.checkpoint} does not exist; name a detfocal checkpoint, "
                                    f"e.g. runs/shapes_retinanet_r18/best.pth after the demo")
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


def report(results: dict[str, list[dict[str, Any]]]) -> str:
    out = []
    if "loss" in results:
        r0 = results["loss"][0]
        out += [f"### Focal loss forward+backward, logits [{r0['batch']}, {r0['num_anchors']}, {r0['num_classes']}]",
                "", loss_table(results["loss"]), ""]
    if "scaling" in results:
        out += ["### Scaling of the compiled loss", "", "| N | C | median ms |", "|---:|---:|---:|"]
        out += [f"| {r['num_anchors']} | {r['num_classes']} | {fmt(r.get('median_ms'))} |" for r in results["scaling"]]
        out += ["", f"Fitted exponent of time against N*C: {fit_exponent(results['scaling']):.2f} (1.0 = linear)", ""]
    if "train" in results:
        out += ["### RetinaNet training step: torchvision's stock RetinaNet against detfocal's, same weights", "",
                train_table(results["train"]), ""]
    if "eval" in results:
        rows = results["eval"]
        reference = rows[0]  # pycocotools
        out += ["### COCO evaluation on the 100-image real sample (load + evaluate + accumulate + summarize)", "",
                "| backend | median ms | speed-up vs pycocotools | AP |", "|---|---:|---:|---:|"]
        for r in rows:
            if "error" in r:
                out.append(f"| {r['impl']} | error: {r['error']} | | |")
                continue
            base = reference.get("median_ms")
            speed_up = fmt(base / r["median_ms"] if base else None, "{:.2f}x")
            out.append(f"| {r['impl']} | {r['median_ms']:.1f} | {speed_up} | {r['AP']:.5f} |")
        if all("stats" in r for r in rows):
            worst = max(abs(a - b) for r in rows[1:] for a, b in zip(reference["stats"], r["stats"]))
            out.append(f"\nLargest difference in the 12 stats between backends: {worst:.1e}")
        out.append("")
    for result in results.get("inference", []):
        out += ["### Evaluation of the demo's val images, by component (wall time, median of the passes)", ""]
        out += [f"error: {result['error']}" if "error" in result else inference_table(result), ""]
    for result in results.get("profile", []):
        model = "torchvision's stock RetinaNet of the same architecture" if result.get("impl") == "torchvision" \
            else "detfocal"
        out += [f"### Profile of the training step of {Path(result['config']).name}, batch {result['batch']}, "
                f"{result['repeats']} steps: {model}", ""]
        if "error" in result:
            out.append(f"error: {result['error']}")
        else:
            out += [f"{result['amp'][0].upper()}{result['amp'][1:]}.", "", profile_table(result)]
        out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="detfocal benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats (< 2 min)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of cases")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per case (default: all)")
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
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))  # its results go to stdout line by line
        return 0
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - set(CASES)
    if unknown:
        raise ValueError(f"--cases: unknown case(s) {sorted(unknown)}; expected {', '.join(CASES)}")
    machine = (f"{cpu_description()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
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
    text = report(results)
    print()
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "quick": args.quick, "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 0
