"""The GPU check's table: one row per test run, loss row, training run and step comparison,
with the target each must meet and a verdict (:mod:`.gpu` runs the check)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .gpu import FIRST_FEW_STEPS, HEAD_VS_SIGMOID, HEAD_VS_TORCHVISION, STEP_VS_TORCHVISION, TRAIN_ITERATIONS
from .timing import fmt

__all__ = ["gpu_table"]


def gpu_table(details: dict[str, Any]) -> str:
    """The check as one markdown table: check, setting, result, target, verdict (ok, MISS, FAILED, -)."""
    dry = details.get("device") != "cuda" or details.get("quick")
    rows = [_tests_row(details.get("tests", {}), dry)]
    rows += _loss_rows(details.get("loss", []), dry)
    train = details.get("train", [])
    rows += [_train_row(run, dry) for run in (train if isinstance(train, list) else [train])]
    rows += _step_rows(details.get("step", []), dry)
    rows.append(_nccl_row(details.get("nccl", {}), dry))
    lines = ["| check | setting | result | target | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def _error_row(check: str, setting: str, error: str, target: str) -> tuple[str, ...]:
    return check, setting, f"error: {error}", target, "FAILED"


def _tests_row(tests: dict[str, Any], dry: bool) -> tuple[str, ...]:
    target = "all pass"
    if "error" in tests:
        return _error_row("tests", "pytest -m cuda", tests["error"], target)
    if tests.get("status") == "skipped" and "why" in tests:
        return "tests", "pytest -m cuda", f"skipped: {tests['why']}", target, "-"
    counts = tests.get("counts", {})
    result = ", ".join(f"{number} {word}" for word, number in counts.items()) or tests.get("status", "?")
    result += f" in {tests.get('seconds', 0):.0f} s" + (f"; failed: {', '.join(tests['failed'][:3])}"
                                                        if tests.get("failed") else "")
    if tests.get("status") == "timeout":
        verdict = "FAILED"
        result += " (killed at its time limit)"
    elif dry:
        verdict = "-"
    else:
        verdict = "ok" if tests.get("status") == "passed" and counts.get("passed", 0) > 0 else "FAILED"
    return "tests", f"pytest -m cuda {Path(tests.get('target', 'tests')).name}", result, target, verdict


def _loss_rows(rows: Any, dry: bool) -> list[tuple[str, ...]]:
    if isinstance(rows, dict):
        return [_error_row("loss", "COCO scale", rows.get("error", "?"), "")]
    out = []
    by_dtype: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_dtype.setdefault(row.get("dtype", "fp32"), {})[row.get("label", row["impl"])] = row
    for dtype, by_label in by_dtype.items():
        torchvision = by_label.get("torchvision's head", {}).get("median_ms")
        sigmoid = by_label.get("one sigmoid pass", {}).get("median_ms")
        for label, row in by_label.items():
            setting = f"{dtype} {label}, [{row['batch']}, {row['num_anchors']}, {row['num_classes']}]"
            target = (f">= {HEAD_VS_TORCHVISION:g}x torchvision, <= {HEAD_VS_SIGMOID:g}x sigmoid"
                      if label == "compiled head" else "")
            if "error" in row:
                out.append(_error_row("loss", setting, row["error"], target))
                continue
            ms = row["median_ms"]
            vs_torchvision = torchvision / ms if torchvision else None
            vs_sigmoid = ms / sigmoid if sigmoid else None
            ratios = ([f"{fmt(vs_torchvision, '{:.1f}x')} torchvision's speed"] if label.endswith(" head")
                      and label != "torchvision's head" else [])
            ratios += [f"{fmt(vs_sigmoid, '{:.2f}x')} one sigmoid pass"] if label != "one sigmoid pass" else []
            result = ", ".join([f"{ms:.2f} ms", *ratios, f"peak +{row['peak_extra_mb']:.0f} MB"])
            if row.get("backend", {}).get("fallback"):
                result += f", fell back to eager ({row['backend']['fallback'][:80]})"
            verdict = "-"
            if target and not dry:
                met = (vs_torchvision is not None and vs_torchvision >= HEAD_VS_TORCHVISION
                       and vs_sigmoid is not None and vs_sigmoid <= HEAD_VS_SIGMOID)
                verdict = "ok" if met else "MISS"
            out.append(("loss", setting, result, target, verdict))
    return out


def _train_row(run: dict[str, Any], dry: bool) -> tuple[str, ...]:
    amp = run.get("amp", "?")
    processes = run.get("processes", 1)
    setting = (f"{processes} processes (NCCL), " if processes > 1 else "") + \
        f"{run.get('iterations', TRAIN_ITERATIONS)} demo iterations, train.amp={amp}"
    target = (f"finite, no skipped step after the first {FIRST_FEW_STEPS}" if amp == "auto"
              else "finite, no skipped step")
    if "error" in run:
        return _error_row("train", setting, run["error"], target)
    skips = (f"{run['skipped_steps']} skipped (the last at step {run['last_skipped_step']})" if run["skipped_steps"]
             else "0 skipped")
    result = (f"{fmt(run.get('images_per_s'))} images/s, {skips}, {'finite' if run['finite'] else 'NOT FINITE'}, "
              f"loss {run['final_loss']:.3f}, {run['seconds']:.0f} s")
    met = run["finite"] and (run["last_skipped_step"] <= FIRST_FEW_STEPS if amp == "auto"
                             else run["skipped_steps"] == 0)
    return "train", setting, result, target, "-" if dry else ("ok" if met else "MISS")


def _step_rows(rows: Any, dry: bool) -> list[tuple[str, ...]]:
    if isinstance(rows, dict):
        return [_error_row("step", "demo training step", rows.get("error", "?"), "")]
    out = []
    for stock, ours in zip(rows[0::2], rows[1::2]):
        precision = ours.get("amp") or stock.get("precision", "?")
        setting = f"demo step, batch {stock.get('batch')}, {precision}: detfocal vs torchvision"
        target = f">= {STEP_VS_TORCHVISION:g}x torchvision"
        error = stock.get("error") or ours.get("error")
        if error:
            out.append(_error_row("step", setting, error, target))
            continue
        ratio = ours["images_per_s"] / stock["images_per_s"]
        result = (f"{ours['images_per_s']:.1f} vs {stock['images_per_s']:.1f} images/s ({ratio:.2f}x), "
                  f"peak +{ours['peak_extra_mb']:.0f} MB")
        out.append(("step", setting, result, target, "-" if dry else ("ok" if ratio >= STEP_VS_TORCHVISION
                                                                        else "MISS")))
    return out


def _nccl_row(nccl: dict[str, Any], dry: bool) -> tuple[str, ...]:
    if nccl.get("status") == "skipped" or not nccl:
        return ("nccl", "torchrun --nproc_per_node=2", f"skipped: {nccl.get('why', 'not run')}",
                "finite, images/s", "-")
    row = _train_row(nccl, dry)
    return ("nccl",) + row[1:]
