"""The gpu case: the one-shot check of the CUDA path (``docs/how-to/gpu-check.md``).

``detfocal benchmark --cases gpu`` (``bash tools/gpu_check.sh``) runs five steps, each in a
subprocess with a time limit inside one deadline, so that the check ends within 8 minutes
whatever a step does (a step that hangs is killed and reported):

- tests: ``pytest -m cuda``, the "cuda" runs of the device-parametrised tests and the
  CUDA-only ones, in a source checkout;
- loss: the loss case at COCO scale in fp32, fp16 and bf16: detfocal's head loss compiled
  and eager, torchvision's head, one elementwise sigmoid pass; peak memory;
- step: the train case's demo row, torchvision's stock RetinaNet against detfocal's;
- train: 200 iterations of the demo config with ``train.amp=auto`` (fp16 + GradScaler on
  CUDA) and with ``bf16``: images/s, skipped steps and finiteness, from ``metrics.jsonl``;
- nccl: that run in two processes (torchrun, NCCL) where two GPUs are present.

It returns the details, which the command writes as JSON after every step and prints as
one table (:mod:`.gpu_report`). ``--device cpu --quick`` is a dry run on the CPU: tiny sizes,
the head's tests only, nothing compiled, 2 training iterations of a tiny model.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .runner import run_cases

__all__ = ["CHECK_SECONDS", "check_device", "run_gpu_check", "steady_images_per_s", "train_summary"]

logger = logging.getLogger(__name__)

# The whole check: 8 minutes, less the interpreter's start and the report.
CHECK_SECONDS = 465.0
# Each step's own limit (a training run's, per run); the deadline cuts the later steps if the
# earlier ones use all of theirs. Measured on no GPU yet: sized from the CPU runs.
BUDGETS = {"tests": 210.0, "data": 60.0, "loss": 120.0, "train": 60.0, "step": 60.0, "nccl": 75.0}
TRAIN_ITERATIONS = 200
NCCL_ITERATIONS = 100
# The targets the table checks (docs/how-to/gpu-check.md).
HEAD_VS_TORCHVISION = 10.0  # the compiled head loss at least this many times torchvision's head
HEAD_VS_SIGMOID = 3.0  # and at most this many elementwise sigmoid passes
STEP_VS_TORCHVISION = 1.0  # the training step at least as fast as torchvision's stock RetinaNet
FIRST_FEW_STEPS = 20  # GradScaler may skip steps while it backs off from 2^16, only in these


def check_device(device: str | None, quick: bool) -> str:
    """The device the check runs on, or a one-line refusal.

    Raises:
        ValueError: no CUDA device for a real check, or a CPU run without ``--quick``.
    """
    import torch

    if device == "cpu":
        if not quick:
            raise ValueError("--cases gpu --device cpu is the dry run of the GPU check: add --quick")
        return "cpu"
    if not torch.cuda.is_available():
        raise ValueError("--cases gpu: no CUDA device here (torch.cuda.is_available() is False); the GPU check "
                         "needs one (--device cpu --quick runs it dry on the CPU)")
    return "cuda"


def _checkout_tests() -> Path | None:
    """A source checkout's tests folder (a wheel install has none)."""
    tests = Path(__file__).resolve().parents[2] / "tests"
    return tests if (tests / "conftest.py").is_file() else None


_running: list[subprocess.Popen] = []  # the step's subprocess, for a TERM that stops the check


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended just now
        pass


def _start(command: Sequence[str], log: Path, cwd: Path | None = None) -> tuple[subprocess.Popen, Any, float]:
    """Start ``command`` in its own session (its process group holds torchrun's workers too), output to ``log``."""
    handle = open(log, "w")
    proc = subprocess.Popen(list(command), stdout=handle, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
    _running.append(proc)
    return proc, handle, time.perf_counter()


def _wait(started: tuple[subprocess.Popen, Any, float], seconds: float, log: Path) -> dict[str, Any]:
    """Wait for a :func:`_start`-ed command at most ``seconds`` more; kill its process group after that."""
    proc, handle, start = started
    try:
        returncode: int | None = proc.wait(timeout=max(seconds, 1.0))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.wait()
        returncode = None
    finally:
        _running.remove(proc)
        handle.close()
    lines = _log_lines(log)
    return {"returncode": returncode, "seconds": time.perf_counter() - start, "timed_out": returncode is None,
            "log": str(log), "tail": lines[-15:]}


def _run(command: Sequence[str], seconds: float, log: Path, cwd: Path | None = None) -> dict[str, Any]:
    """Run ``command`` (see :func:`_start`) for at most ``seconds``."""
    return _wait(_start(command, log, cwd), seconds, log)


def _log_lines(path: str | Path) -> list[str]:
    return Path(path).read_text(errors="replace").strip().splitlines()


def _failure(run: dict[str, Any]) -> str:
    if run["timed_out"]:
        return f"killed after {run['seconds']:.0f} s (its time limit)"
    errors = [line for line in run["tail"] if line.startswith("error:")] or run["tail"][-1:] or ["no output"]
    return f"exit {run['returncode']}: {errors[-1][:200]}"


# --------------------------------------------------------------------------------------------
# The steps


def _tests_step(quick: bool, seconds: float, work: Path) -> dict[str, Any]:
    tests = _checkout_tests()
    if tests is None:
        return {"status": "skipped", "why": "no tests folder (a source checkout has one)"}
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "why": "pytest is not installed (pip install detfocal[test])"}
    target = tests / "test_heads.py" if quick else tests
    run = _run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider",
                "--durations=5", str(target)], seconds, work / "tests.log", cwd=tests.parent)
    counts = {}
    summary = next((line for line in reversed(run["tail"]) if re.search(r"\d+ (passed|failed|skipped|error)", line)),
                   "")
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary):
        counts["errors" if word.startswith("error") else word] = int(number)
    failed = [line for line in _log_lines(run["log"]) if line.startswith(("FAILED ", "ERROR "))]
    status = ("timeout" if run["timed_out"] else "passed" if run["returncode"] == 0 else
              "skipped" if run["returncode"] == 5 else "failed")  # 5: pytest collected no test
    return {"status": status, "counts": counts, "summary": summary.strip("= "), "failed": failed[:20],
            "seconds": run["seconds"], "log": run["log"], "target": str(target)}


def _loss_step(device: str, quick: bool, repeats: int, seconds: float) -> list[dict[str, Any]]:
    from .loss import DTYPES, coco_num_anchors

    num_anchors = coco_num_anchors() // (64 if quick else 1)
    impls = [("detfocal_head", "1", "compiled head"), ("detfocal_head", "0", "eager head"),
             ("torchvision_head", None, "torchvision's head"), ("sigmoid_pass", None, "one sigmoid pass")]
    if quick and device == "cpu":
        impls = impls[1:]  # a dry run compiles nothing: Inductor's C++ build takes minutes on a CPU
    specs = [{"kind": "loss", "case": "gpu", "impl": impl, "compile": compile_mode, "label": label, "dtype": dtype,
              "device": device, "threads": None, "batch": 2, "num_anchors": num_anchors, "num_classes": 80,
              "repeats": 1 if quick else repeats}
             for dtype in DTYPES for impl, compile_mode, label in impls]
    return run_cases([{key: value for key, value in spec.items() if value is not None} for spec in specs],
                     seconds / len(specs))


def _step_step(device: str, quick: bool, config: Path, seconds: float) -> list[dict[str, Any]]:
    import torch

    from detfocal.config import load_config
    from detfocal.engine.precision import resolve_amp

    cfg = load_config(config)
    precisions = ["fp32"] + (["default"] if resolve_amp("auto", torch.device(device))[0] is not None else [])
    specs = [{"kind": "train", "case": "gpu", "config": str(config), "model": config.name,
              "size": cfg.model.min_size, "batch": 2 if quick else cfg.train.batch_size, "impl": impl,
              "precision": precision, "repeats": 1 if quick else 5, "device": device}
             for precision in precisions for impl in ("torchvision", "detfocal")]
    return run_cases(specs, seconds / len(specs))


# The data stage's own call, for a config and its overrides (argv[1], argv[2:]).
MAKE_DATA = ("import sys; from detfocal.config import load_config, shapes_kwargs; "
             "from detfocal.data.shapes import ensure_dataset; "
             "ensure_dataset(**shapes_kwargs(load_config(sys.argv[1], sys.argv[2:])))")


def _train_overrides(work: Path, quick: bool, amp: str, iterations: int) -> list[str]:
    if quick:  # the tests' tiny run: 8 images of 64 px, a thin model, batch 4
        return [(f"data.shapes={{root: {work / 'shapes_tiny'}, num_train: 8, num_val: 4, image_size: 64, "
                 "min_object_size: 6, max_objects: 3}"), "model.min_size=64", "model.max_size=64",
                "model.fpn_channels=32", "model.head.num_convs=1", "model.head.norm=none", "train.batch_size=4",
                "train.max_iters=2", "train.warmup_iters=2", "data.workers=0", "eval.batch_size=4",
                f"train.amp={amp}", "train.log_interval=1", "eval.interval=100", "train.tensorboard=false"]
    return [f"data.shapes.root={work / 'shapes'}", f"train.max_iters={iterations}", f"train.amp={amp}",
            "train.log_interval=1", "eval.interval=100", "train.tensorboard=false"]


def _train_step(config: Path, work: Path, name: str, amp: str, quick: bool, seconds: float,
                processes: int = 1) -> dict[str, Any]:
    out = work / name
    iterations = NCCL_ITERATIONS if processes > 1 else TRAIN_ITERATIONS
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    command = [*launcher, "-m", "detfocal", "train", str(config), "--output-dir", str(out), "--set",
               *_train_overrides(work, quick, amp, iterations)]
    run = _run(command, seconds, work / f"{name}.log")
    result = {"amp": amp, "processes": processes, "seconds": run["seconds"], "log": run["log"], "output_dir": str(out)}
    if run["returncode"] != 0:
        return {**result, "error": _failure(run)}
    from detfocal.utils.io import read_jsonl

    return {**result, **train_summary(read_jsonl(out / "metrics.jsonl"))}


def steady_images_per_s(records: Sequence[dict[str, Any]]) -> float | None:
    """Images/s over the last three quarters of the longest epoch of ``metrics.jsonl``'s train records.

    Each record's ``images_per_s`` counts from its epoch's start, so two records i < j of one
    epoch, s steps into it, give the rate between them: (s_j - s_i) / (s_j / r_j - s_i / r_i)
    (the batch size cancels). The first quarter, with cuDNN's and the allocator's warm-up, is left out.
    """
    epochs: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        epochs.setdefault(int(record.get("epoch", 0)), []).append(record)
    longest = max(epochs.values(), key=len, default=[])
    if len(longest) < 2:
        return longest[0].get("images_per_s") if longest else None
    start = int(longest[0]["step"]) - 1  # the step before the epoch's first logged one (log_interval 1)
    first, last = longest[len(longest) // 4], longest[-1]
    s_i, s_j = int(first["step"]) - start, int(last["step"]) - start
    r_i, r_j = float(first["images_per_s"]), float(last["images_per_s"])
    if s_j <= s_i or r_i <= 0 or r_j <= 0 or s_j / r_j <= s_i / r_i:
        return r_j
    return (s_j - s_i) / (s_j / r_j - s_i / r_i)


def train_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Iterations, steady images/s, skipped steps (and the step of the last skip), finiteness of a run's records."""
    steps = [record for record in records if record.get("type") == "train"]
    if not steps:
        return {"error": "metrics.jsonl holds no train record"}
    skipped = int(steps[-1].get("skipped_steps", 0))
    last_skip = next((int(r["step"]) for r in steps if int(r.get("skipped_steps", 0)) == skipped), 0) if skipped else 0
    finite = all(math.isfinite(float(r.get("loss", math.nan))) for r in steps)
    return {"iterations": int(steps[-1]["step"]), "images_per_s": steady_images_per_s(steps),
            "skipped_steps": skipped, "last_skipped_step": last_skip, "finite": finite,
            "final_loss": float(steps[-1].get("loss", math.nan))}


# --------------------------------------------------------------------------------------------
# The check


def run_gpu_check(*, device: str, quick: bool, config: Path, repeats: int = 7,
                  on_step: Callable[[dict[str, Any]], None] = lambda details: None,
                  seconds: float = CHECK_SECONDS) -> dict[str, Any]:
    """Run the check's steps in order within ``seconds``; returns the details (``gpu_table`` reads them).

    Args:
        device: "cuda", or "cpu" for the dry run (see :func:`check_device`).
        quick: the dry run's sizes.
        config: the demo config (the train and step steps).
        repeats: timed repeats of each loss row.
        on_step: called with the details after every step (the command writes its JSON there).
        seconds: the deadline of the whole check.

    Returns:
        ``{"device", "quick", "work_dir", "tests", "loss", "step", "train", "nccl"}``; a step
        the deadline left no time for holds ``{"error": "no time left ..."}``.
    """
    import threading

    def stop(signum: int, frame: Any) -> None:
        for proc in _running:  # in its own session: a TERM to the check's process group does not reach it
            _kill_group(proc)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        return _run_steps(device=device, quick=quick, config=config, repeats=repeats, on_step=on_step,
                          seconds=seconds)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_steps(*, device: str, quick: bool, config: Path, repeats: int, on_step: Callable[[dict[str, Any]], None],
               seconds: float) -> dict[str, Any]:
    import torch

    deadline = time.monotonic() + seconds
    work = Path(tempfile.mkdtemp(prefix="detfocal-gpu-check-"))
    details: dict[str, Any] = {"device": device, "quick": quick, "work_dir": str(work)}
    logger.info("GPU check on %s%s; run folders, data and logs in %s", device, " (dry run)" if device == "cpu" else "",
                work)

    def guarded(name: str, run: Callable[[float], Any]) -> Any:
        """``run(seconds left for the step)``, or an error row: no time left, or what it raised."""
        left = min(BUDGETS[name] * (2 if device == "cpu" else 1), deadline - time.monotonic())
        logger.info("  %s (up to %.0f s)", name, max(left, 0))
        if left < 5:
            return {"error": f"no time left within the check's {seconds:.0f} s"}
        try:
            return run(left)
        except Exception as exc:  # noqa: BLE001 - one step's failure is a row of the table
            return {"error": f"{type(exc).__name__}: {exc}"}

    # The demo's data (1700 images) is made on one core while the tests run, as the data stage would.
    data_log = work / "data.log"
    data = _start([sys.executable, "-c", MAKE_DATA, str(config), *_train_overrides(work, quick, "auto", 1)], data_log)
    details["tests"] = guarded("tests", lambda left: _tests_step(quick, left, work))
    on_step(details)
    made = _wait(data, max(min(BUDGETS["data"], deadline - time.monotonic()), 1.0), data_log)
    if made["returncode"] != 0:
        logger.warning("the demo's data: %s; the training runs make it themselves", _failure(made))
    details["loss"] = guarded("loss", lambda left: _loss_step(device, quick, repeats, left))
    on_step(details)
    details["train"] = []
    for amp in ("auto", "bf16"):
        run = guarded("train", lambda left, amp=amp: _train_step(config, work, f"train_amp_{amp}", amp, quick, left))
        details["train"].append({"amp": amp, **run})
        on_step(details)
    details["step"] = guarded("step", lambda left: _step_step(device, quick, config, left))
    on_step(details)
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if gpus >= 2:
        details["nccl"] = {"amp": "auto", "processes": 2, **guarded(
            "nccl", lambda left: _train_step(config, work, "nccl_2_processes", "auto", quick, left, processes=2))}
    else:
        details["nccl"] = {"status": "skipped", "why": f"{gpus} CUDA device(s); the two-process NCCL run needs 2"}
    on_step(details)
    return details
