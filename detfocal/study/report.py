"""The imbalance study's outputs: OUT/table.md, study.csv, study.json and study.png."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from detfocal.study.imbalance import FL_ALPHA, FL_GAMMA, LOSS_NAMES, LOSSES, SHARE_GAMMAS, Plan, shares, write_json
from detfocal.utils.io import atomic_write


def _spread(values: list[float]) -> tuple[float | None, float | None]:
    return (sum(values) / len(values), max(values) - min(values)) if values else (None, None)


def _aps(row: dict[str, Any], loss: str, seeds: int) -> list[float]:
    """The finished runs' AP of one loss at one point."""
    return [row[f"{loss}_ap_seed{seed}"] for seed in range(seeds) if row[f"{loss}_ap_seed{seed}"] is not None]


def table_rows(plan: Plan, seeds: int, measured: dict[str, dict], results: dict[tuple, dict | None],
               analyses: dict[str, dict | None]) -> list[dict[str, Any]]:
    """One row per point: its layout, measured anchors, each run's AP (None: not finished), means and ranges.

    Args:
        plan: the study's plan.
        seeds: seeds 0 .. seeds - 1 make the columns.
        measured: each point's :func:`~detfocal.study.imbalance.measure_anchors`.
        results: ``(point, loss, seed)`` -> the run's metrics.json; missing or None: not finished.
        analyses: each point's ``detfocal analyze`` summary of its first-seed FL model, or None.

    Returns:
        JSON-ready rows; AP values as in metrics.json (0-1), the range is max - min over the seeds.
    """
    rows = []
    for point in plan.points:
        stats = measured[point.name]
        row: dict[str, Any] = {
            "point": point.name, "image_size": point.image_size, "max_objects": point.max_objects,
            "sizes_x_ratios": point.layout,
            "anchors_per_location": len(point.anchor_sizes[0]) * len(point.aspect_ratios),
            **{key: stats[key] for key in ("anchors_per_image", "positives_per_image", "negatives_per_positive")}}
        for loss in LOSSES:
            aps = [None if (m := results.get((point.name, loss, seed))) is None else m["AP"] for seed in range(seeds)]
            row |= {f"{loss}_ap_seed{seed}": ap for seed, ap in enumerate(aps)}
            row[f"{loss}_ap_mean"], row[f"{loss}_ap_range"] = _spread([ap for ap in aps if ap is not None])
        both = row["ce_ap_mean"] is not None and row["fl_ap_mean"] is not None
        row["fl_minus_ce"] = row["fl_ap_mean"] - row["ce_ap_mean"] if both else None
        trained = shares(analyses[point.name]) if analyses.get(point.name) else {}
        for gamma in SHARE_GAMMAS:
            row[f"init_neg_share_gamma{gamma:g}"] = stats["negative_loss_share"][f"{gamma:g}"]
            row[f"fl_neg_share_gamma{gamma:g}"] = trained.get(f"{gamma:g}")
        rows.append(row)
    return rows


def points_table(plan: Plan, measured: dict[str, dict]) -> str:
    """The points as ``--measure-only`` prints them: layout and measured anchors, in markdown."""
    lines = ["| point | image px | objects <= | sizes x ratios | anchors/image | positives/image | neg:pos |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for point in plan.points:
        stats = measured[point.name]
        lines.append(f"| {point.name} | {point.image_size} | {point.max_objects} | {point.layout} | "
                     f"{stats['anchors_per_image']:,.0f} | {stats['positives_per_image']:.2f} | "
                     f"{stats['negatives_per_positive']:,.0f} |")
    return "\n".join(lines)


def _ap(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.3g}%"


def markdown_table(rows: list[dict[str, Any]], seeds: int) -> str:
    """AP x 100 per seed, mean and range (max - min) for CE and FL; neg share from the trained FL model."""
    per_seed = [f"{LOSS_NAMES[loss]} s{seed}" for loss in LOSSES for seed in range(seeds)]
    header = ["point", "image px", "objects <=", "sizes x ratios", "anchors/image", "positives/image", "neg:pos",
              *per_seed[:seeds], "CE mean", "CE range", *per_seed[seeds:], "FL mean", "FL range", "FL - CE",
              "neg share g0 (FL)", "neg share g2 (FL)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [row["point"], str(row["image_size"]), str(row["max_objects"]), row["sizes_x_ratios"],
                 f"{row['anchors_per_image']:,.0f}", f"{row['positives_per_image']:.2f}",
                 f"{row['negatives_per_positive']:,.0f}"]
        for loss in LOSSES:
            cells += [_ap(row[f"{loss}_ap_seed{seed}"]) for seed in range(seeds)]
            cells += [_ap(row[f"{loss}_ap_mean"]), _ap(row[f"{loss}_ap_range"])]
        cells += [_ap(row["fl_minus_ce"]), _share(row["fl_neg_share_gamma0"]), _share(row["fl_neg_share_gamma2"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_study(rows: list[dict[str, Any]], plan: Plan, seeds: int, path: Path) -> Path:
    """Left: AP against negatives per positive (log x), CE and FL, each seed and the mean with its range.
    Right: the negatives' share of the loss at gamma 0 and 2, trained (first-seed FL model) and untrained."""
    from detfocal.evaluation.plots import new_figure

    figure = new_figure(figsize=(11, 4.2), dpi=120, layout="constrained")
    ap_axes, share_axes = figure.subplots(1, 2)
    labels = {"ce": f"CE (gamma 0, alpha {plan.ce_alpha:g})", "fl": f"FL (gamma {FL_GAMMA:g}, alpha {FL_ALPHA:g})"}
    for loss, colour in zip(LOSSES, ("tab:blue", "tab:red")):
        done = [(row["negatives_per_positive"], [100 * ap for ap in _aps(row, loss, seeds)]) for row in rows]
        done = [(x, aps) for x, aps in done if aps]
        if not done:
            continue
        seeds_x = [x for x, aps in done for _ in aps]
        ap_axes.scatter(seeds_x, [ap for _, aps in done for ap in aps], color=colour, alpha=0.45, s=18)
        means = [sum(aps) / len(aps) for _, aps in done]
        ap_axes.errorbar([x for x, _ in done], means, yerr=[[m - min(aps) for m, (_, aps) in zip(means, done)],
                                                            [max(aps) - m for m, (_, aps) in zip(means, done)]],
                         color=colour, marker="o", capsize=3, label=labels[loss])
    for row in rows:
        ap_axes.annotate(row["point"], (row["negatives_per_positive"], 0), xycoords=("data", "axes fraction"),
                         xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8, color="grey")
    ap_axes.set(xscale="log", xlabel="negatives per positive (measured)", ylabel="AP (0.5:0.95) x 100",
                title=f"{plan.iterations} iterations, {seeds} seed(s): mean, range, each seed")
    ap_axes.set_ylim(bottom=0)
    for gamma, marker, colour in zip(SHARE_GAMMAS, ("o", "s"), ("tab:purple", "tab:green")):
        for source, style, label in (("fl", "-", "trained FL model"), ("init", "--", "untrained model")):
            points = [(row["negatives_per_positive"], 100 * row[f"{source}_neg_share_gamma{gamma:g}"]) for row in rows
                      if row[f"{source}_neg_share_gamma{gamma:g}"]]
            if points:
                share_axes.plot(*zip(*points), linestyle=style, marker=marker, color=colour,
                                label=rf"$\gamma = {gamma:g}$, {label}")
    share_axes.set(xscale="log", yscale="log", xlabel="negatives per positive (measured)",
                   ylabel="negatives' share of the loss (%)", title="Where the classification loss comes from")
    ratios = [row["negatives_per_positive"] for row in rows]
    for axes in (ap_axes, share_axes):
        axes.set_xlim(min(ratios) / 1.6, max(ratios) * 1.6)  # every point, trained or not (and its label)
        axes.grid(alpha=0.3, which="both")
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    return atomic_write(path, lambda handle: figure.savefig(handle, format="png"))


def write_outputs(out: Path, plan: Plan, seeds: int, rows: list[dict[str, Any]], runs: list[dict]) -> list[Path]:
    """OUT/table.md, study.csv (AP as in metrics.json, 0-1), study.json and study.png."""
    text = markdown_table(rows, seeds)
    note = (f"\nAP x 100 after {plan.iterations} iterations; CE: gamma 0, alpha {plan.ce_alpha:g}; FL: gamma "
            f"{FL_GAMMA:g}, alpha {FL_ALPHA:g}. neg:pos measured on the untrained model over {plan.images} val "
            f"images; neg share: the negatives' share of the classification loss of the trained FL model "
            f"(seed 0) at gamma 0 and 2, both at its alpha {FL_ALPHA:g}, as detfocal analyze computes it.\n")
    paths = [atomic_write(out / "table.md", lambda handle: handle.write(text + "\n" + note), binary=False)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths.append(atomic_write(out / "study.csv", lambda handle: handle.write(buffer.getvalue()), binary=False))
    paths.append(write_json(out / "study.json", {"plan": plan.as_json(), "seeds": seeds, "rows": rows, "runs": runs}))
    paths.append(plot_study(rows, plan, seeds, out / "study.png"))
    return paths
