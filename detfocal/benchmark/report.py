"""The benchmark's report: markdown tables of every case's results."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .evaluation import inference_table
from .loss import fit_exponent, loss_table
from .profile import profile_table
from .timing import fmt
from .training import train_table

__all__ = ["report"]


def report(results: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: one section per case that ran, with its table; an error in place of a failed row.

    Args:
        results: ``{case name: [spec merged with its result, ...]}`` as :func:`run_cases` gives.

    Returns:
        The report's text.
    """
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
        out += _eval_section(results["eval"])
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


def _eval_section(rows: list[dict[str, Any]]) -> list[str]:
    reference = rows[0]  # pycocotools
    out = ["### COCO evaluation on the 100-image real sample (load + evaluate + accumulate + summarize)", "",
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
    return out
