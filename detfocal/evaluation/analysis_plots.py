"""The files of ``detfocal analyze``: Lin et al. 2017's Figure 4, the GHM gradient histogram, the table.

Computed by :mod:`detfocal.evaluation.analysis`; drawn and written here. Every number of a
figure is also in a CSV next to it, and :func:`check_outputs` refuses, before any work, a
folder that already holds an analysis unless it may be overwritten.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import IO, Any, Mapping, Sequence

import numpy as np

from detfocal.evaluation.analysis import (AnchorLosses, analysis_gammas, analyze_split, cumulative_loss,
                                          run_focal_parameters, summarize)
from detfocal.evaluation.plots import new_figure
from detfocal.utils.io import atomic_write, ensure_writable_dir, write_json_atomic

__all__ = ["GRADIENT_BINS", "OUTPUT_NAMES", "check_outputs", "figure_cumulative_loss", "figure_gradient_norms",
           "format_table", "gradient_histograms", "summary_sentences", "write_analysis"]

OUTPUT_NAMES = ("summary.json", "summary.csv", "cumulative_loss.csv", "cumulative_loss.png",
                "gradient_histogram.csv", "gradient_norms.png")
GRADIENT_BINS = 50
# Columns of summary.csv after "gamma": the table's shared numbers, then the per-gamma ones.
_SHARED = ("images", "anchors_per_image", "positives_per_image", "ignored_per_image", "negatives_per_image",
           "negatives_per_positive", "alpha")
_PER_GAMMA = ("negative_loss_share", "easy_negative_loss_share", "confident_negative_loss_share",
              "effective_negatives_per_image", "effective_negatives_per_positive", "hardest_negatives_for_half_loss",
              "hardest_positives_for_half_loss")


def check_outputs(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse a folder holding any of :data:`OUTPUT_NAMES` unless ``overwrite``; nothing is created.

    Raises:
        ValueError: ``out_dir`` is a file, or holds outputs and ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, expected a folder")
    existing = [name for name in OUTPUT_NAMES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise ValueError(f"--out {out_dir} already holds an analysis ({', '.join(existing)}); pass --overwrite to "
                         "replace it, or choose another folder")
    return out_dir


def _label(gamma: float, run_gamma: float | None) -> str:
    return rf"$\gamma = {gamma:g}$" + (" (this run)" if run_gamma is not None and gamma == run_gamma else "")


def figure_cumulative_loss(result: AnchorLosses, run_gamma: float | None = None, num_points: int = 1001) -> Any:
    """Lin et al. 2017, Figure 4: cumulative normalised loss of positives and of negatives, one curve per gamma."""
    fig = new_figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, positive, title in ((axes[0], True, "positive samples"), (axes[1], False, "negative samples")):
        mask = result.positive == positive
        for gamma, losses in zip(result.gammas, result.losses):
            x, y = cumulative_loss(losses[mask], num_points)
            ax.plot(x, y, label=_label(gamma, run_gamma), linewidth=2)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"fraction of {'foreground' if positive else 'background'} samples")
        ax.set_ylabel("cumulative normalized loss")
        ax.set_title(f"{title} ({int(mask.sum()):,} anchors)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    return fig


def gradient_histograms(result: AnchorLosses, num_bins: int = GRADIENT_BINS) -> dict[str, Any]:
    """Histograms of the per-anchor gradient norms, on linear bins (GHM's Figure 1) and on log bins.

    Both gammas share the bins: linear from 0 to the largest norm, logarithmic from the
    smallest nonzero norm to the largest. Norms of exactly 0 fall in no log bin and are
    counted apart.

    Returns:
        ``{"linear": edges [B + 1], "log": edges [B + 1], "counts": {scale: {gamma: [B]}},
        "zero": {gamma: count}}``.
    """
    norms = result.gradient_norms
    largest = float(norms.max()) if norms.size else 0.0
    nonzero = norms[norms > 0]
    smallest = float(nonzero.min()) if nonzero.size else largest
    edges = {"linear": np.linspace(0.0, largest if largest > 0 else 1.0, num_bins + 1),
             "log": np.geomspace(smallest, largest, num_bins + 1) if 0 < smallest < largest
             else np.linspace(smallest, smallest + 1.0, num_bins + 1)}
    counts = {scale: {gamma: np.histogram(row, bins=bins)[0] for gamma, row in zip(result.gradient_gammas, norms)}
              for scale, bins in edges.items()}
    return {**edges, "counts": counts,
            "zero": {gamma: int((row == 0).sum()) for gamma, row in zip(result.gradient_gammas, norms)}}


def figure_gradient_norms(result: AnchorLosses, histograms: Mapping[str, Any] | None = None) -> Any:
    """Li et al. 2019 (GHM), Figure 1: how many anchors have each gradient norm, for CE and FL (log count)."""
    histograms = histograms or gradient_histograms(result)
    fig = new_figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    titles = {"linear": "linear bins (as GHM, Figure 1)", "log": "logarithmic bins"}
    for ax, scale in zip(axes, ("linear", "log")):
        edges = histograms[scale]
        ax.set_title(titles[scale])
        for gamma in result.gradient_gammas:
            name = "CE" if gamma == 0 else "FL"
            ax.stairs(np.maximum(histograms["counts"][scale][gamma], 0.5), edges, linewidth=2,
                      label=rf"{name} ($\gamma = {gamma:g}$)")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5)
        if scale == "log":
            ax.set_xscale("log")
        ax.set_xlabel("gradient norm of an anchor's loss w.r.t. its logits" + (" (log scale)" if scale == "log" else ""))
        ax.set_ylabel("number of anchors (log scale)")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.3g}%"


def summary_sentences(summary: Mapping[str, Any], low: float = 0.0, high: float = 2.0) -> list[str]:
    """A few sentences that read the numbers of :func:`~detfocal.evaluation.analysis.summarize`,
    comparing gamma ``low`` with ``high`` ([] when either was not analysed)."""
    by_gamma = {row["gamma"]: row for row in summary["per_gamma"]}
    if low not in by_gamma or high not in by_gamma:
        return []
    a, b = by_gamma[low], by_gamma[high]
    ratio = summary["negatives_per_positive"]
    return [
        (f"On {summary['images']} images: {summary['anchors_per_image']:.0f} anchors per image, of which "
         f"{summary['positives_per_image']:.1f} positive and {summary['ignored_per_image']:.1f} ignored; "
         f"{'no positives' if ratio is None else f'{ratio:.0f} negatives per positive'}."),
        (f"At gamma = {low:g}, negatives carry {_percent(a['negative_loss_share'])} of the classification loss, and "
         f"negatives with p < {summary['easy_probability']:g} carry {_percent(a['confident_negative_loss_share'])}; "
         f"gamma = {high:g} brings these to {_percent(b['negative_loss_share'])} and "
         f"{_percent(b['confident_negative_loss_share'])}."),
        (f"The easiest {100 * summary['easy_fraction']:g}% of negatives carry "
         f"{_percent(a['easy_negative_loss_share'])} of the loss at gamma = {low:g} and "
         f"{_percent(b['easy_negative_loss_share'])} at gamma = {high:g}."),
        (f"Effective negatives per image (their summed loss over the hardest one's): "
         f"{a['effective_negatives_per_image']:.1f} at gamma = {low:g} and {b['effective_negatives_per_image']:.1f} "
         f"at gamma = {high:g}, out of {summary['negatives_per_image']:.0f}."),
        (f"Half of the negatives' loss comes from the hardest {_percent(a['hardest_negatives_for_half_loss'])} of "
         f"them at gamma = {low:g} and {_percent(b['hardest_negatives_for_half_loss'])} at gamma = {high:g}; for "
         f"positives, {_percent(a['hardest_positives_for_half_loss'])} and "
         f"{_percent(b['hardest_positives_for_half_loss'])}."),
    ]


def _number(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def format_table(summary: Mapping[str, Any]) -> str:
    """The table as aligned text: the anchor counts on one line, then one row per gamma."""
    ratio = summary["negatives_per_positive"]
    head = (f"{summary['images']} images: {summary['anchors_per_image']:.0f} anchors/image, "
            f"{summary['positives_per_image']:.2f} positives/image, {summary['ignored_per_image']:.2f} ignored/image, "
            f"negatives:positive {_number(ratio)}:1, alpha {summary['alpha']}")
    columns = ("gamma", "neg share", f"easiest {100 * summary['easy_fraction']:g}% neg",
               f"neg p<{summary['easy_probability']:g}", "effective neg/image", "hardest neg for 1/2 loss")
    rows = [(f"{row['gamma']:g}", _percent(row["negative_loss_share"]), _percent(row["easy_negative_loss_share"]),
             _percent(row["confident_negative_loss_share"]), _number(row["effective_negatives_per_image"]),
             _percent(row["hardest_negatives_for_half_loss"])) for row in summary["per_gamma"]]
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
    lines = ["  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in (columns, *rows)]
    return "\n".join([head, *lines])


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    def write(handle: IO[str]) -> None:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)

    return atomic_write(path, write, binary=False)


def _save(figure: Any, path: Path) -> Path:
    return atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=120))


def write_analysis(result: AnchorLosses, summary: Mapping[str, Any], out_dir: str | Path, *, overwrite: bool = False,
                   run_gamma: float | None = None, metadata: Mapping[str, Any] | None = None) -> list[Path]:
    """Write :data:`OUTPUT_NAMES` to ``out_dir`` (each file atomically).

    Args:
        result: from :func:`~detfocal.evaluation.analysis.collect_anchor_losses`.
        summary: ``summarize(result)``.
        out_dir: the folder, created if missing.
        overwrite: replace the files of an earlier analysis.
        run_gamma: the run's gamma, marked "(this run)" in the figure's legend.
        metadata: JSON-ready facts stored in ``summary.json`` (checkpoint, split, ...).

    Returns:
        The paths written.

    Raises:
        ValueError: as :func:`check_outputs`.
        OSError: a file cannot be written.
    """
    out_dir = check_outputs(out_dir, overwrite)
    sentences = summary_sentences(summary)
    written = [write_json_atomic(out_dir / "summary.json", {**(metadata or {}), **summary, "sentences": sentences})]
    written.append(_write_csv(out_dir / "summary.csv", ("gamma", *_SHARED, *_PER_GAMMA),
                              [(row["gamma"], *(summary[key] for key in _SHARED), *(row[key] for key in _PER_GAMMA))
                               for row in summary["per_gamma"]]))
    curves, header = [], ["fraction"]
    for group, mask in (("positives", result.positive), ("negatives", ~result.positive)):
        for gamma, losses in zip(result.gammas, result.losses):
            x, y = cumulative_loss(losses[mask])
            curves.append(y)
            header.append(f"{group}_gamma_{gamma:g}")
    written.append(_write_csv(out_dir / "cumulative_loss.csv", header, np.column_stack([x, *curves]).tolist()))
    written.append(_save(figure_cumulative_loss(result, run_gamma), out_dir / "cumulative_loss.png"))
    histograms = gradient_histograms(result)
    rows = []
    for scale in ("linear", "log"):
        edges = histograms[scale]
        for index in range(len(edges) - 1):
            rows.append((scale, edges[index], edges[index + 1],
                         *(int(histograms["counts"][scale][gamma][index]) for gamma in result.gradient_gammas)))
    rows.append(("zero", 0.0, 0.0, *(histograms["zero"][gamma] for gamma in result.gradient_gammas)))
    written.append(_write_csv(out_dir / "gradient_histogram.csv",
                              ("scale", "bin_low", "bin_high", *(f"count_gamma_{g:g}" for g in result.gradient_gammas)),
                              rows))
    written.append(_save(figure_gradient_norms(result, histograms), out_dir / "gradient_norms.png"))
    return written


def write_model_analysis(model: Any, cfg: Any, out_dir: str | Path, *, label_to_category_id: Sequence[int],
                         split: str = "val", num_images: int = 200, overwrite: bool = False,
                         generate_data: bool = False, metadata: Mapping[str, Any] | None = None,
                         progress: bool | None = None) -> tuple[dict[str, Any], list[Path]]:
    """What ``detfocal analyze`` does once the model is loaded: analyse a split and write the files.

    The run's alpha and gamma come from ``cfg.model.head`` (or the model's head); the
    gammas are :data:`~detfocal.evaluation.analysis.GAMMAS` plus the run's (from its config).

    Args:
        model: the trained detector (a :class:`~detfocal.modeling.retinanet.FocalRetinaNet`).
        cfg: its ``Config``.
        out_dir: the output folder, checked (:func:`check_outputs`) before any work.
        label_to_category_id: the model's category id per label.
        split, num_images, generate_data, progress: as
            :func:`~detfocal.evaluation.analysis.analyze_split`.
        overwrite: replace an earlier analysis in ``out_dir``.
        metadata: JSON-ready facts for ``summary.json``.

    Returns:
        ``(summary, paths written)``; the summary also holds ``run_gamma`` and ``split``.

    Raises:
        ValueError, FileNotFoundError: as :func:`check_outputs` and ``analyze_split``.
    """
    from detfocal.config import config_to_dict

    out_dir = ensure_writable_dir(check_outputs(out_dir, overwrite), "--out")
    alpha, gamma = run_focal_parameters(model, config_to_dict(cfg)["model"].get("head"))
    result = analyze_split(model, cfg, label_to_category_id=label_to_category_id, split=split,
                           num_images=num_images, alpha=alpha, gammas=analysis_gammas(gamma),
                           generate_data=generate_data, progress=progress)
    summary = {"split": split, "run_gamma": gamma, **summarize(result)}
    paths = write_analysis(result, summary, out_dir, overwrite=overwrite, run_gamma=gamma, metadata=metadata)
    return summary, paths
