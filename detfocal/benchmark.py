"""Benchmark detfocal's focal loss, head and training step against torchvision.

Each case runs in its own subprocess, so its peak memory is its own. Prints markdown
tables and writes JSON. Uses only the standard library, torch and torchvision (plus
detfocal itself).

    detfocal benchmark                 # all cases, full size (~15 min on 2 cores)
    detfocal benchmark --quick         # smaller inputs, under 2 minutes
    detfocal benchmark --cases loss,scaling --json out.json

Cases:
    loss      focal loss forward+backward at COCO scale: B=2, N=anchors of 800x1333 (P3-P7, 9 per
              location), C=80, ~100 positives and 1% ignored per image.
    scaling   the compiled loss at N/4, N, 4N and C = 20, 80, 365; fitted exponent of time vs N*C.
    train     RetinaNet training-step images/s, detfocal head vs torchvision's, fp32 and the CPU default.
    eval      COCO evaluation time on the shared real sample (100 images): pycocotools against
              faster-coco-eval, each loading, evaluating, accumulating and summarizing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from detfocal.cli import run_cli
from detfocal.engine.precision import cpu_description, cpu_supports_bf16

FEATURE_STRIDES = (8, 16, 32, 64, 128)
# Where the eval case finds the real 100-image COCO sample, relative to the working directory.
COCO_SAMPLE_DIRS = (Path("../shared/data/coco_val2014_100"), Path("tests/data"))


def coco_num_anchors(height: int = 800, width: int = 1333, anchors_per_location: int = 9) -> int:
    """Anchors torchvision's RetinaNet makes for one image (padded to a multiple of 32)."""
    height, width = (math.ceil(s / 32) * 32 for s in (height, width))
    return anchors_per_location * sum(math.ceil(height / s) * math.ceil(width / s) for s in FEATURE_STRIDES)


# ------------------------------------------------------------------------------- worker side
class PeakRSS:
    """Samples this process's resident memory in a thread; ``extra_mb`` is the peak above the start."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _time(fn: Callable[[], Any], repeats: int, device: str) -> tuple[float, float, float]:
    """(first-call seconds, median ms, peak extra MB) of ``fn``."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with PeakRSS() as meter:
            fn()
        extra = meter.extra_mb
    return first, statistics.median(times) * 1000, extra


def _loss_inputs(batch: int, num_anchors: int, num_classes: int, device: str, seed: int = 0) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, num_anchors, num_classes, generator=generator) * 2 - 4).to(device)
    matched_idxs, labels_per_image, targets = [], [], []
    num_boxes = 10
    for _ in range(batch):
        matched = torch.full((num_anchors,), -1, dtype=torch.long)
        order = torch.randperm(num_anchors, generator=generator)
        matched[order[:100]] = torch.randint(0, num_boxes, (100,), generator=generator)  # ~100 positives
        matched[order[100:100 + num_anchors // 100]] = -2  # 1% between the IoU thresholds
        box_labels = torch.randint(0, num_classes, (num_boxes,), generator=generator)
        matched_idxs.append(matched.to(device))
        targets.append({"labels": box_labels.to(device)})
        label = torch.where(matched >= 0, box_labels[matched.clamp(min=0)], torch.full_like(matched, num_classes))
        labels_per_image.append(torch.where(matched == -2, torch.full_like(label, -1), label))
    labels = torch.stack(labels_per_image).to(device)
    return {"logits": logits, "labels": labels, "matched_idxs": matched_idxs, "targets": targets}


def _loss_case(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torchvision

    device = spec["device"]
    inputs = _loss_inputs(spec["batch"], spec["num_anchors"], spec["num_classes"], device)
    base = inputs["logits"]
    logits = base.clone().requires_grad_(True)
    impl = spec["impl"]
    if impl in ("detfocal_compiled", "detfocal_eager"):
        os.environ["DETFOCAL_COMPILE"] = "1" if impl == "detfocal_compiled" else "0"
        from detfocal.losses import sigmoid_focal_loss

        labels = inputs["labels"]

        def step() -> None:
            logits.grad = None
            num_foreground = (labels >= 0).logical_and(labels < base.shape[-1]).sum().clamp(min=1)
            (sigmoid_focal_loss(logits, labels, 0.25, 2.0, "sum") / num_foreground).backward()
    elif impl == "detfocal_head":
        os.environ["DETFOCAL_COMPILE"] = spec.get("compile", "auto")
        from detfocal.modeling.heads import FocalClassificationHead

        head = FocalClassificationHead(8, 9, base.shape[-1]).to(device)

        def step() -> None:
            logits.grad = None
            head.compute_loss(inputs["targets"], {"cls_logits": logits}, inputs["matched_idxs"]).backward()
    elif impl == "torchvision_head":
        from torchvision.models.detection.retinanet import RetinaNetClassificationHead

        head = RetinaNetClassificationHead(8, 9, base.shape[-1]).to(device)

        def step() -> None:
            logits.grad = None
            head.compute_loss(inputs["targets"], {"cls_logits": logits}, inputs["matched_idxs"]).backward()
    elif impl in ("torchvision_ops_float", "detfocal_float"):
        one_hot = torch.zeros_like(base)
        labels = inputs["labels"]
        fg = (labels >= 0) & (labels < base.shape[-1])
        one_hot[fg, labels[fg]] = 1.0
        if impl == "detfocal_float":
            os.environ["DETFOCAL_COMPILE"] = spec.get("compile", "1")
            from detfocal.losses import sigmoid_focal_loss as loss_fn
        else:
            loss_fn = torchvision.ops.sigmoid_focal_loss

        def step() -> None:
            logits.grad = None
            loss_fn(logits, one_hot, 0.25, 2.0, "sum").backward()
    elif impl == "sigmoid_pass":
        def step() -> None:
            torch.sigmoid(base)
    else:
        raise ValueError(f"unknown impl {impl!r}")
    first, median_ms, extra_mb = _time(step, spec["repeats"], device)
    result = {"first_call_s": first, "median_ms": median_ms, "peak_extra_mb": extra_mb,
              "logits_mb": base.numel() * base.element_size() / 2**20}
    if impl.startswith("detfocal"):
        from detfocal.losses import backend

        result["backend"] = backend()
    return result


def _train_case(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from detfocal.modeling.retinanet import build_retinanet

    torch.manual_seed(0)
    device = spec["device"]
    size, batch, num_classes = spec["size"], spec["batch"], 80
    model = build_retinanet(num_classes, backbone=spec["backbone"], min_size=size, max_size=size,
                            head={"type": "focal"})
    if spec["head"] == "torchvision":
        from torchvision.models.detection.retinanet import RetinaNetClassificationHead

        model.head.classification_head = RetinaNetClassificationHead(
            model.backbone.out_channels, model.anchor_generator.num_anchors_per_location()[0], num_classes)
    precision = spec["precision"]
    amp_dtype = None
    if precision == "default":
        if device == "cuda":
            amp_dtype = torch.float16
        elif cpu_supports_bf16():
            amp_dtype = torch.bfloat16
    model = model.to(device)
    if amp_dtype is not None and device == "cpu":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    scaler = torch.amp.GradScaler(device, enabled=amp_dtype == torch.float16)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=generator).to(device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=generator) * size * 0.6
        wh = 16 + torch.rand(4, 2, generator=generator) * size * 0.3
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(0, num_classes, (4,), generator=generator).to(device)})

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            losses = model(images, targets)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()

    step()  # warm-up (and compile, where the loss compiles)
    first, median_ms, extra_mb = _time(step, spec["repeats"], device)
    return {"median_ms": median_ms, "images_per_s": batch / (median_ms / 1000), "peak_extra_mb": extra_mb,
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"}


def _eval_case(spec: dict[str, Any]) -> dict[str, Any]:
    from detfocal.evaluation.coco import STAT_NAMES, evaluate_results

    data = Path(spec["data_dir"])
    gt, results = data / "instances_val2014_100.json", data / "instances_val2014_fakebbox100_results.json"
    evaluate_results(gt, results, backend=spec["impl"])  # warm-up: imports, page cache
    times = []
    for _ in range(spec["repeats"]):
        # Everything a run pays: read both jsons, index, loadRes, evaluate, accumulate, summarize.
        start = time.perf_counter()
        summary = evaluate_results(gt, results, backend=spec["impl"])
        times.append(time.perf_counter() - start)
    return {"median_ms": statistics.median(times) * 1000, "AP": summary["AP"],
            "stats": [summary[name] for name in STAT_NAMES]}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    kind = spec["kind"]
    if kind == "loss":
        return _loss_case(spec)
    if kind == "train":
        return _train_case(spec)
    if kind == "eval":
        return _eval_case(spec)
    raise ValueError(f"unknown case kind {kind!r}")


# ------------------------------------------------------------------------------- driver side
def run_case(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one case in a fresh interpreter; its last stdout line is the JSON result."""
    # A fixed mmap threshold makes glibc return every large free to the OS at once, so the
    # sampled RSS follows live tensor memory instead of the allocator's cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-m", "detfocal.benchmark", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**spec, "error": tail}
    return {**spec, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _fmt(value: float | None, pattern: str = "{:.1f}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def loss_table(rows: list[dict[str, Any]]) -> str:
    by_impl = {r["impl"]: r for r in rows if "error" not in r}
    tv = by_impl.get("torchvision_head", {}).get("median_ms")
    sig = by_impl.get("sigmoid_pass", {}).get("median_ms")
    lines = ["| implementation | median ms | vs torchvision head | vs one sigmoid pass | peak extra MB | x logits bytes |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | error: {r['error']} | | | | |")
            continue
        ms = r["median_ms"]
        lines.append(
            f"| {r['impl']} | {ms:.1f} | {_fmt(tv / ms if tv else None, '{:.1f}x')} | "
            f"{_fmt(ms / sig if sig else None, '{:.2f}x')} | {r['peak_extra_mb']:.0f} | "
            f"{r['peak_extra_mb'] / r['logits_mb']:.2f} |")
    return "\n".join(lines)


def fit_exponent(rows: list[dict[str, Any]]) -> float:
    """Least-squares slope of log(time) against log(N*C)."""
    points = [(math.log(r["num_anchors"] * r["num_classes"] * r["batch"]), math.log(r["median_ms"]))
              for r in rows if "error" not in r]
    if len(points) < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def build_specs(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    quick = args.quick
    n = coco_num_anchors() // (8 if quick else 1)
    repeats = 3 if quick else args.repeats
    common = {"device": args.device, "threads": args.threads}
    specs: dict[str, list[dict[str, Any]]] = {}
    if "loss" in args.cases:
        impls = ["detfocal_head", "detfocal_compiled", "detfocal_eager", "torchvision_head",
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
        settings = [("resnet18", 256, 8)] if quick else [("resnet18", 256, 8), ("resnet50", 512, 2)]
        specs["train"] = [{**common, "kind": "train", "backbone": bb, "size": size, "batch": batch, "head": head,
                           "precision": precision, "repeats": 2 if quick else 5}
                          for bb, size, batch in settings for precision in ("fp32", "default")
                          for head in ("torchvision", "detfocal")]
    if "eval" in args.cases:
        candidates = [args.coco_sample] if args.coco_sample else COCO_SAMPLE_DIRS
        data_dir = next((Path(d) for d in candidates if (Path(d) / "instances_val2014_100.json").is_file()), None)
        if data_dir is None:
            raise ValueError(f"--coco-sample: no instances_val2014_100.json in {[str(d) for d in candidates]}; "
                             f"name the folder of the 100-image COCO sample")
        specs["eval"] = [{**common, "kind": "eval", "impl": backend, "data_dir": str(data_dir), "repeats": repeats}
                         for backend in ("pycocotools", "faster_coco_eval")]
    return specs


def report(results: dict[str, list[dict[str, Any]]]) -> str:
    out = []
    if "loss" in results:
        r0 = results["loss"][0]
        out += [f"### Focal loss forward+backward, logits [{r0['batch']}, {r0['num_anchors']}, {r0['num_classes']}]",
                "", loss_table(results["loss"]), ""]
    if "scaling" in results:
        out += ["### Scaling of the compiled loss", "", "| N | C | median ms |", "|---:|---:|---:|"]
        out += [f"| {r['num_anchors']} | {r['num_classes']} | {_fmt(r.get('median_ms'))} |" for r in results["scaling"]]
        out += ["", f"Fitted exponent of time against N*C: {fit_exponent(results['scaling']):.2f} (1.0 = linear)", ""]
    if "train" in results:
        out += ["### RetinaNet training step", "",
                "| backbone | px | batch | precision | stock head img/s | detfocal head img/s | ratio |",
                "|---|---:|---:|---|---:|---:|---:|"]
        rows = results["train"]
        for stock, ours in zip(rows[0::2], rows[1::2]):
            s, o = stock.get("images_per_s"), ours.get("images_per_s")
            out.append(f"| {stock['backbone']} | {stock['size']} | {stock['batch']} | "
                       f"{ours.get('amp', stock['precision'])} | {_fmt(s, '{:.2f}')} | {_fmt(o, '{:.2f}')} | "
                       f"{_fmt(o / s if s and o else None, '{:.2f}')} |")
        out.append("")
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
            speed_up = _fmt(base / r["median_ms"] if base else None, "{:.2f}x")
            out.append(f"| {r['impl']} | {r['median_ms']:.1f} | {speed_up} | {r['AP']:.5f} |")
        if all("stats" in r for r in rows):
            worst = max(abs(a - b) for r in rows[1:] for a, b in zip(reference["stats"], r["stats"]))
            out.append(f"\nLargest difference in the 12 stats between backends: {worst:.1e}")
        out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="detfocal benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats (< 2 min)")
    parser.add_argument("--cases", default="loss,scaling,train,eval", help="comma-separated subset of cases")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per case (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed per case")
    parser.add_argument("--coco-sample", type=Path, default=None,
                        help="folder with instances_val2014_100.json and the fake results (eval case)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - {"loss", "scaling", "train", "eval"}
    if unknown:
        raise ValueError(f"--cases: unknown case(s) {sorted(unknown)}; expected loss, scaling, train, eval")
    machine = (f"{cpu_description()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    print(f"detfocal benchmark: {machine}{' (quick)' if args.quick else ''}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {}
    for name, specs in build_specs(args).items():
        results[name] = []
        for spec in specs:
            label = spec.get("impl") or spec.get("backbone", name)
            print(f"  running {name}: {label} {spec.get('head', '')} {spec.get('precision', '')}".rstrip(), flush=True)
            results[name].append(run_case(spec, args.timeout))
    text = report(results)
    print()
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "quick": args.quick, "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
