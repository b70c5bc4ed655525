"""Figures: the focal loss (the paper's Figure 1, its gradients, FL against FL*), training curves,
per-class AP and precision-recall curves.

Every curve is computed with detfocal's own losses (and their gradients), so the figures
double as a visual check of the implementation. matplotlib is imported only when a
figure is drawn, so ``import detfocal`` does not need it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from detfocal.evaluation.coco import CocoEvaluator, per_class_table, write_per_class_csv
from detfocal.utils.io import atomic_write, read_jsonl
from detfocal.losses import sigmoid_focal_loss, sigmoid_focal_loss_star

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The gammas of Lin et al. 2017, Figure 1.
FIGURE1_GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
# FL* settings of the paper's appendix (33.8 and 33.9 AP), as (gamma, beta).
FL_STAR_SETTINGS = ((2.0, 1.0), (4.0, 0.0))
# pr_curves.png gives every class a colour and a legend entry up to this many classes;
# beyond, only the best and worst few, so the legend stays readable (COCO has 80).
MAX_LABELLED_CLASSES = 20
NUM_EXTREME_CLASSES = 5
# logit(1) is inf, where the loss would be 0 * inf; sigmoid(40) rounds to 1 in fp64.
_MAX_LOGIT = 40.0


def _loss_and_grad(loss_fn, x: Tensor) -> tuple[Tensor, Tensor]:
    """Loss of each logit in ``x`` (target 1, one class) and dloss/dx from autograd."""
    x = x.detach().clone().requires_grad_(True)
    logits = x[:, None]  # [N] -> [N, 1]: N rows of one class
    loss = loss_fn(logits, torch.ones_like(logits))[:, 0]
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def focal_loss_curves(gammas: Sequence[float] = FIGURE1_GAMMAS,
                      num_points: int = 1000) -> tuple[Tensor, dict[float, Tensor], dict[float, Tensor]]:
    """FL(p_t) and |dFL/dx| on a grid of p_t in (0, 1], as in Lin et al. 2017, Figure 1.

    Computed with :func:`~detfocal.losses.sigmoid_focal_loss` (alpha = -1, target 1) on
    logits x = logit(p_t), in float64.

    Args:
        gammas: focusing parameters, one curve each.
        num_points: grid size.

    Returns:
        ``(p_t [N], {gamma: loss [N]}, {gamma: |dloss/dx| [N]})``.
    """
    p_t = torch.linspace(0.0, 1.0, num_points + 1, dtype=torch.float64)[1:]  # drop p_t = 0 (loss inf)
    x = torch.logit(p_t).clamp(max=_MAX_LOGIT)
    losses, grads = {}, {}
    for gamma in gammas:
        loss, grad = _loss_and_grad(lambda z, t: sigmoid_focal_loss(z, t, alpha=-1, gamma=gamma), x)
        losses[gamma], grads[gamma] = loss, grad.abs()
    return p_t, losses, grads


def fl_star_curves(x_range: tuple[float, float] = (-5.0, 5.0),
                   num_points: int = 1000) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """CE, FL (gamma = 2) and FL* (paper appendix settings) against x_t, with dloss/dx_t.

    Args:
        x_range: the x_t interval.
        num_points: grid size.

    Returns:
        ``(x_t [N], {label: (loss [N], dloss/dx_t [N])})``; labels are mathtext strings.
    """
    x_t = torch.linspace(x_range[0], x_range[1], num_points, dtype=torch.float64)
    curves = {
        "CE": _loss_and_grad(lambda z, t: sigmoid_focal_loss(z, t, alpha=-1, gamma=0.0), x_t),
        r"FL, $\gamma = 2$": _loss_and_grad(lambda z, t: sigmoid_focal_loss(z, t, alpha=-1, gamma=2.0), x_t),
    }
    for gamma, beta in FL_STAR_SETTINGS:
        curves[rf"FL*, $\gamma = {gamma:g}, \beta = {beta:g}$"] = _loss_and_grad(
            lambda z, t, g=gamma, b=beta: sigmoid_focal_loss_star(z, t, gamma=g, beta=b, alpha=-1), x_t)
    return x_t, curves


def new_figure(**kwargs: Any) -> "Figure":
    """A matplotlib ``Figure`` not attached to pyplot.

    ``Figure.savefig`` needs no backend, so this works on headless machines and leaves a
    notebook's or an interactive session's backend alone.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("detfocal.evaluation.plots needs matplotlib: pip install matplotlib") from exc
    return Figure(**kwargs)


def _curves_against_p_t(p_t: Tensor, curves: Mapping[float, Tensor], ylabel: str) -> tuple["Figure", Any]:
    """One line per gamma against the probability of the ground-truth class."""
    fig = new_figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for gamma, curve in curves.items():
        ax.plot(p_t.numpy(), curve.numpy(), label=rf"$\gamma = {gamma:g}$", linewidth=2)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability of ground truth class")
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper right")
    return fig, ax


def figure_focal_loss(gammas: Sequence[float] = FIGURE1_GAMMAS) -> "Figure":
    """Lin et al. 2017, Figure 1: FL against the probability of the ground-truth class."""
    p_t, losses, _ = focal_loss_curves(gammas)
    fig, ax = _curves_against_p_t(p_t, losses, "loss")
    ax.set_ylim(0, 5)
    # The paper's annotation: the easy examples (p_t > .5) that FL down-weights.
    ax.axvspan(0.6, 1.0, color="0.92", zorder=0)
    ax.annotate("", xy=(1.0, 1.0), xytext=(0.6, 1.0), arrowprops={"arrowstyle": "<->", "color": "0.3"})
    ax.text(0.8, 1.1, "well-classified\nexamples", ha="center", va="bottom")
    ax.text(0.3, 4.3, r"CE$(p_t) = -\log(p_t)$", ha="center")
    ax.text(0.3, 3.9, r"FL$(p_t) = -(1 - p_t)^\gamma \log(p_t)$", ha="center")
    return fig


def figure_focal_gradient(gammas: Sequence[float] = FIGURE1_GAMMAS) -> "Figure":
    """The gradient magnitude |dFL/dx| against p_t (from autograd of detfocal's loss)."""
    p_t, _, grads = focal_loss_curves(gammas)
    fig, ax = _curves_against_p_t(p_t, grads, r"$|\partial\,\mathrm{FL} / \partial x|$")
    # Not capped at 1: for gamma >= 1 the slope exceeds CE's near p_t = 0 (about 1.3 at gamma = 5).
    ax.set_ylim(bottom=0)
    ax.set_title("gradient w.r.t. the logit (CE: $1 - p_t$)")
    return fig


def figure_fl_star() -> "Figure":
    """Lin et al. 2017, appendix Figures 5 and 6: CE, FL and FL* and their derivatives against x_t."""
    x_t, curves = fl_star_curves()
    fig = new_figure(figsize=(11, 4.5), layout="constrained")
    ax_loss, ax_grad = fig.subplots(1, 2)
    for label, (loss, grad) in curves.items():
        ax_loss.plot(x_t.numpy(), loss.numpy(), label=label, linewidth=2)
        ax_grad.plot(x_t.numpy(), grad.numpy(), label=label, linewidth=2)
    ax_loss.set_ylim(0, 5)
    ax_loss.set_ylabel("loss")
    ax_grad.set_ylabel(r"$d\,\mathrm{loss} / d x_t$")
    for ax in (ax_loss, ax_grad):
        ax.set_xlim(float(x_t[0]), float(x_t[-1]))
        ax.set_xlabel(r"$x_t$")
        ax.legend()
    return fig


def save_figure(fig: "Figure", out_dir: Path, name: str) -> list[Path]:
    """Write ``fig`` as ``out_dir/name.png`` and ``out_dir/name.svg``; return both paths."""
    paths = [Path(out_dir) / f"{name}.{ext}" for ext in ("png", "svg")]
    for path in paths:
        atomic_write(path, lambda handle, ext=path.suffix[1:]: fig.savefig(handle, format=ext, dpi=150))
    return paths


def write_figures(out_dir: str | Path) -> list[Path]:
    """Draw every figure into ``out_dir`` (created if missing), PNG and SVG each.

    Args:
        out_dir: output directory.

    Returns:
        The written paths: focal_loss (Figure 1), focal_gradient and fl_star, PNG then SVG.

    Raises:
        NotADirectoryError: ``out_dir`` exists and is not a directory.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir must be a directory, got the file {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, draw in (("focal_loss", figure_focal_loss), ("focal_gradient", figure_focal_gradient),
                       ("fl_star", figure_fl_star)):
        paths += save_figure(draw(), out_dir, name)
    return paths


# --------------------------------------------------------------------------------------
# Training runs and evaluations.
# --------------------------------------------------------------------------------------
def _save_png(figure: "Figure", path: str | Path) -> Path:
    """``figure`` as a PNG, written atomically: a kill or a full disk never leaves half a plot."""
    return atomic_write(path, lambda handle: figure.savefig(handle, format="png"))


def plot_training_curves(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write ``loss.png`` (train losses by step) and, if any evaluation ran, ``ap.png`` (AP by epoch).

    Returns:
        The paths written.
    """
    from matplotlib.ticker import MaxNLocator


    records = read_jsonl(metrics_path)
    out_dir = Path(out_dir)
    written = []
    steps = [r for r in records if r.get("type") == "train"]
    if steps:
        figure = new_figure(figsize=(7, 4), layout="constrained")
        axes = figure.add_subplot()
        for name in ("loss", "classification", "bbox_regression"):
            axes.plot([r["step"] for r in steps], [r[name] for r in steps], label=name)
        axes.set_xlabel("iteration")
        axes.set_ylabel("loss")
        axes.set_yscale("log")
        axes.legend()
        written.append(_save_png(figure, out_dir / "loss.png"))
    evaluations = [r for r in records if r.get("type") == "epoch" and "AP" in r]
    if evaluations:
        figure = new_figure(figsize=(7, 4), layout="constrained")
        axes = figure.add_subplot()
        for name in ("AP", "AP50", "AP75"):
            axes.plot([r["epoch"] + 1 for r in evaluations], [r[name] for r in evaluations], marker="o", label=name)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        axes.set_ylabel("COCO box AP (val)")
        axes.set_ylim(0, 1)
        axes.legend()
        written.append(_save_png(figure, out_dir / "ap.png"))
    return written


def plot_per_class_ap(summary_or_evaluator: Mapping[str, Any] | CocoEvaluator, path: str | Path) -> Path:
    """Write a horizontal bar chart of per-class AP as a PNG; classes without ground truth are left out.

    Args:
        summary_or_evaluator: a summary dict (with "per_class") or an evaluator (summarized
            now if it has not been).
        path: output PNG path.

    Returns:
        The path written.
    """

    if isinstance(summary_or_evaluator, CocoEvaluator):
        summary = summary_or_evaluator.summary or summary_or_evaluator.summarize()
    else:
        summary = summary_or_evaluator
    if "per_class" not in summary:
        raise ValueError(f"summary_or_evaluator: expected a summary with 'per_class', got keys {sorted(summary)}")
    items = [(name, ap) for name, ap in summary["per_class"].items() if ap >= 0]
    figure = new_figure(figsize=(6, 1.5 + 0.25 * len(items)), layout="constrained")
    axes = figure.add_subplot()
    axes.barh([name for name, _ in items], [ap for _, ap in items], color="tab:blue")
    axes.invert_yaxis()  # first class on top
    axes.set_xlim(0, 1)
    axes.set_xlabel("AP (IoU 0.50:0.95)")
    axes.set_title(f"Per-class AP, mean {summary.get('AP', float('nan')):.3f}")
    return atomic_write(path, lambda handle: figure.savefig(handle, format="png"))


def figure_pr_curves(evaluator: CocoEvaluator) -> "Figure":
    """Precision-recall curves at IoU 0.5 and 0.75 (area all, 100 detections), one colour per class.

    Up to :data:`MAX_LABELLED_CLASSES` classes each get a colour and a legend entry (name,
    AP50 / AP75), best AP first down the columns; with more, only the :data:`NUM_EXTREME_CLASSES`
    best (left column) and worst (right column) by AP do, and the rest are thin grey lines. A
    thick black line in each panel is the mean over classes with ground truth. The evaluator
    is summarized now if it has not been.

    Args:
        evaluator: the evaluator whose ``coco_eval.eval["precision"]`` is plotted.

    Returns:
        The figure.
    """
    rows = per_class_table(evaluator)  # summarizes if needed
    coco_eval = evaluator.coco_eval
    precision = coco_eval.eval["precision"]  # (T, R, K, A, M)
    recall = coco_eval.params.recThrs
    with_gt = [k for k, row in enumerate(rows) if row["AP"] >= 0]  # classes without ground truth are all -1
    by_ap = sorted(with_gt, key=lambda k: -rows[k]["AP"])
    if len(with_gt) <= MAX_LABELLED_CLASSES:
        labelled, title = by_ap, "class: AP50 / AP75, best AP first"
        columns = len(labelled) if len(labelled) <= 5 else 4
    else:
        labelled = by_ap[:NUM_EXTREME_CLASSES] + by_ap[-NUM_EXTREME_CLASSES:]
        title = (f"best (left) and worst (right) {NUM_EXTREME_CLASSES} of {len(with_gt)} classes by AP: "
                 f"AP50 / AP75; the others in grey")
        columns = 2  # the legend fills down the columns: best in one, worst in the other
    palette = _class_colours(len(labelled))
    colour_of = {k: palette[i] for i, k in enumerate(sorted(labelled))}  # by category, stable between runs
    figure = new_figure(figsize=(10, 4.5), layout="constrained")
    panels = figure.subplots(1, 2, sharey=True)
    for axes, iou in zip(panels, (0.5, 0.75)):
        t = int(np.argmin(np.abs(coco_eval.params.iouThrs - iou)))
        curves = precision[t, :, :, 0, -1].T  # (R, K) -> (K, R)
        for k in with_gt:
            if k not in colour_of:
                axes.plot(recall, curves[k], color="0.6", linewidth=0.5, alpha=0.6)
        for k in labelled:  # after the grey ones, so drawn over them
            axes.plot(recall, curves[k], color=colour_of[k], linewidth=1.2,
                      label=f"{rows[k]['class']}: {rows[k]['AP50']:.3f} / {rows[k]['AP75']:.3f}")
        if with_gt:
            mean = curves[with_gt].mean(axis=0)
            mean_line = axes.plot(recall, mean, color="black", linewidth=2.5,
                                  label=f"mean, AP{int(iou * 100)} = {mean.mean():.3f}")
            axes.legend(handles=mean_line, loc="lower left")
        axes.set_title(f"IoU {iou}")
        axes.set_xlabel("recall")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.01)
    panels[0].set_ylabel("precision")
    if labelled:
        handles, labels = panels[0].get_legend_handles_labels()
        handles, labels = handles[:len(labelled)], labels[:len(labelled)]  # the classes, not the mean
        figure.legend(handles, labels, loc="outside lower center", ncol=columns, title=title,
                      fontsize="small", title_fontsize="small", frameon=False)
    return figure


def _class_colours(count: int) -> list[Any]:
    """``count`` distinct colours, none grey (the unlabelled classes) or black (the mean).

    tab20's dark shades, then its light ones, then two more; evenly spaced in turbo beyond 20.
    """
    from matplotlib import colormaps

    if count > 20:
        return [colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, count)]
    tab20 = colormaps["tab20"]
    greys = (14, 15)
    dark = [tab20(i) for i in range(0, 20, 2) if i not in greys]
    light = [tab20(i) for i in range(1, 20, 2) if i not in greys]
    return (dark + light + ["navy", "maroon"])[:count]


def plot_pr_curves(evaluator: CocoEvaluator, path: str | Path) -> Path:
    """Write :func:`figure_pr_curves` as a PNG (atomically); return the path."""
    figure = figure_pr_curves(evaluator)
    return atomic_write(path, lambda handle: figure.savefig(handle, format="png"))


def write_reports(evaluator: CocoEvaluator, out_dir: str | Path) -> list[Path]:
    """Write ``per_class_ap.png``, ``pr_curves.png`` and ``per_class.csv`` into ``out_dir``.

    Args:
        evaluator: a CocoEvaluator, summarized now if it has not been.
        out_dir: the output folder, created if missing.

    Returns:
        The three paths, in that order.

    Example:
        >>> write_reports(evaluator, "runs/demo")  # after evaluator.summarize()
    """
    out_dir = Path(out_dir)
    return [plot_per_class_ap(evaluator, out_dir / "per_class_ap.png"),
            plot_pr_curves(evaluator, out_dir / "pr_curves.png"),
            write_per_class_csv(evaluator, out_dir / "per_class.csv")]


def write_plots(evaluator: CocoEvaluator, out_dir: str | Path) -> list[Path]:
    """The former name of :func:`write_reports`, which the engine still calls; the same three files."""
    return write_reports(evaluator, out_dir)


def plot_ablation(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], path: str | Path) -> Path:
    """AP against the first grid key, one line per value of the others (``detfocal ablate``)."""
    x_key, other = keys[0], list(keys[1:])
    figure = new_figure(figsize=(6, 4), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    groups: dict[tuple, list[tuple[float, float]]] = {}
    for row in rows:
        group = tuple(row["setting"][key] for key in other)
        groups.setdefault(group, []).append((float(row["setting"][x_key]), 100 * row["AP"]))
    for group, points in groups.items():
        points.sort()
        label = ", ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in zip(other, group)) or "AP"
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axes.set_xlabel(x_key.rsplit(".", 1)[-1])
    axes.set_ylabel("AP (0.5:0.95) x 100")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save_png(figure, path)
