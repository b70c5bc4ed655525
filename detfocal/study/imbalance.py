"""Alpha-balanced cross entropy against the focal loss, as negatives per positive grow from 10^2 to 10^4.

    detfocal study imbalance                          # 5 points x (CE, FL) x 2 seeds, about an hour on 2 cores
    detfocal study imbalance --measure-only           # each point's anchors and negatives per positive, no training
    detfocal study imbalance --seeds 3                # add a third seed: only the new runs train
    detfocal study imbalance --quick --out runs/quick # 2 tiny points, 1 seed, 2 iterations: a smoke test

Lin et al. 2017 (Table 1) credit the focal loss's lead over alpha-balanced cross entropy
(34.0 against 31.1 AP) to the ~100k anchors of an image, nearly all easy negatives. On the
shapes demo (1023 anchors, about 70 negatives per positive) the two are within seed noise.
Each point of this study keeps the shapes images and raises the imbalance: at most one
object per image, then more anchors per location in shapes no object matches (aspect
ratios 1:16 to 16:1, sizes of 512 px and more), so the positives stay and only easy
negatives are added. At every point, every seed trains both losses:

- CE: gamma 0 with alpha 0.75, the paper's best alpha for gamma 0 (Table 1a);
- FL: gamma 2 with alpha 0.25, the paper's best setting (Table 1b).

Every run is ``detfocal train`` (through ``detfocal ablate``'s runner) with the same
iterations, ending with an evaluation. A point's negatives per positive are measured with
detfocal's own anchors, matcher and labels on the untrained model over the first
``--images`` val images; the first seed's trained FL model is analysed as ``detfocal
analyze`` does. Writes OUT/table.md, OUT/study.csv, OUT/study.json and OUT/study.png
(after every finished run, so an interrupted study shows what it has). A finished run (its
metrics.json exists) is not trained again: the same command resumes an interrupted study.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from detfocal.ablate import setting_overrides
from detfocal.config import load_config
from detfocal.utils.io import atomic_write

DEFAULT_CONFIG = "shapes_retinanet_r18"
# The demo's anchors: 3 octave scales per level, P3-P7 (configs/shapes_retinanet_r18.yaml).
DEMO_SIZES = ((16, 20, 25), (32, 40, 50), (64, 80, 101), (128, 161, 203), (256, 322, 406))
# Shapes no object matches, so they add negatives and no positive. The shapes' boxes are about
# square: a 1:4 box over a square has IoU 1/3 at best, below the 0.4 background threshold.
# Objects are at most 64 px, so an anchor of 512 px or more overlaps one by IoU 1/64 at most.
LONG_RATIOS = (1 / 16, 1 / 12, 1 / 10, 1 / 8, 1 / 6, 1 / 5, 1 / 4, 1.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0)
HUGE_SIZES = (512, 645, 812, 1024, 1290, 1625, 2048)
LOSSES = ("ce", "fl")
LOSS_NAMES = {"ce": "CE", "fl": "FL"}
FL_GAMMA, FL_ALPHA = 2.0, 0.25  # Lin et al. 2017, Table 1b
CE_ALPHA = 0.75  # Table 1a: the best alpha at gamma 0
SHARE_GAMMAS = (0.0, 2.0)


@dataclass(frozen=True)
class Point:
    """One anchor density: the shapes data's objects and the anchor layout; the rest is the base config's.

    Attributes:
        name: the point's folder and row, e.g. "d3".
        max_objects: most objects per image (``data.shapes.max_objects``).
        anchor_sizes: sizes in pixels per level P3-P7 (``model.anchor_sizes``), as many at every level.
        aspect_ratios: height / width ratios at every level (``model.aspect_ratios``).
        image_size: the square images' side, generated and fed at that size.
        min_object_size: the smallest object's diameter in pixels (``data.shapes.min_object_size``).
    """

    name: str
    max_objects: int
    anchor_sizes: tuple[tuple[int, ...], ...]
    aspect_ratios: tuple[float, ...]
    image_size: int = 128
    min_object_size: int = 16

    @property
    def layout(self) -> str:
        """Anchors per location as "sizes x ratios", e.g. "3 x 15"."""
        return f"{len(self.anchor_sizes[0])} x {len(self.aspect_ratios)}"


POINTS = (
    Point("d1", 6, DEMO_SIZES, (1.0,)),  # the demo itself
    Point("d2", 1, DEMO_SIZES, (1.0,)),
    Point("d3", 1, DEMO_SIZES, (0.25, 1.0, 4.0)),
    Point("d4", 1, DEMO_SIZES, LONG_RATIOS),
    Point("d5", 1, tuple(level + HUGE_SIZES for level in DEMO_SIZES), LONG_RATIOS),
)
QUICK_POINTS = (Point("q1", 3, DEMO_SIZES, (1.0,), image_size=64, min_object_size=12),
                Point("q2", 1, DEMO_SIZES, LONG_RATIOS, image_size=64, min_object_size=12))
# --quick runs as the tests' tiny ones: a thin FPN, one head conv, fp32, batch 4.
QUICK_OVERRIDES = ("model.fpn_channels=32", "model.head.num_convs=1", "model.head.norm=none", "train.batch_size=4",
                   "train.amp=off", "data.workers=0", "eval.batch_size=4", "train.log_interval=1")
FULL_ITERATIONS = 300


@dataclass(frozen=True)
class Plan:
    """Everything that makes the runs of a study folder comparable; plan.json holds it (the seeds aside)."""

    config: str
    points: tuple[Point, ...]
    iterations: int
    num_train: int
    num_val: int
    images: int
    ce_alpha: float
    overrides: tuple[str, ...]
    quick: bool

    def run_overrides(self) -> list[str]:
        """Every run's ``--set`` items: the iteration budget (one evaluation, at the end), then the user's."""
        budget = [f"train.max_iters={self.iterations}", "train.epochs=1000", "eval.interval=1000",
                  f"train.warmup_iters={max(1, self.iterations // 5)}", "train.tensorboard=false"]
        return [*budget, *(QUICK_OVERRIDES if self.quick else ()), *self.overrides]

    def point_overrides(self, point: Point, out: Path) -> list[str]:
        """A point's ``--set`` items: :meth:`run_overrides`, then its data (under ``out``) and anchors."""
        shapes = {"root": str(data_root(out, point)), "num_train": self.num_train, "num_val": self.num_val,
                  "image_size": point.image_size, "max_objects": point.max_objects,
                  "min_object_size": point.min_object_size, "seed": 0}
        return [*self.run_overrides(), f"data.shapes={json.dumps(shapes)}", f"model.min_size={point.image_size}",
                f"model.max_size={point.image_size}", f"model.anchor_sizes={json.dumps(point.anchor_sizes)}",
                f"model.aspect_ratios={json.dumps(point.aspect_ratios)}"]

    def loss_setting(self, loss: str, seed: int) -> dict[str, Any]:
        """``{dotted key: value}`` of a ``loss`` ("ce" or "fl") run with ``seed``, as ``detfocal ablate`` takes it."""
        gamma, alpha = (0.0, self.ce_alpha) if loss == "ce" else (FL_GAMMA, FL_ALPHA)
        return {"model.head.gamma": gamma, "model.head.alpha": alpha, "train.seed": seed}

    def as_json(self) -> dict[str, Any]:
        """The plan as plan.json holds it (tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))


def data_root(out: Path, point: Point) -> Path:
    """Points with the same images share them: OUT/data/<size>px_<objects>obj."""
    return out / "data" / f"{point.image_size}px_{point.max_objects}obj"


def run_dir(out: Path, point: Point, loss: str, seed: int) -> Path:
    """A run's folder: OUT/<point>/<loss>_seed<seed>."""
    return out / point.name / f"{loss}_seed{seed}"


# ----------------------------------------------------------------------------------------------
# Measuring a point: its anchors' labels, and the negatives' share of the loss


def measure_anchors(cfg: Any, num_images: int, seed: int = 0) -> dict[str, Any]:
    """A config's anchor statistics on its untrained model, over the first ``num_images`` val images.

    The labels are those of training (:func:`detfocal.evaluation.analysis.anchor_logits_and_labels`:
    the model's transform, anchors, matcher and crowd rule), so they do not depend on the
    weights; the loss shares are those at the head's initialisation (prior p = 0.01).

    Args:
        cfg: a loaded config with a ``data.shapes`` section or existing val data.
        num_images: images measured, >= 1.
        seed: the torch seed of the untrained weights.

    Returns:
        ``summarize``'s ``images``, ``anchors_per_image``, ``positives_per_image``,
        ``ignored_per_image``, ``negatives_per_image`` and ``negatives_per_positive``, with
        ``negative_loss_share``: ``{"0": share, "2": share}`` at gamma 0 and 2 (the config's alpha).
    """
    import torch

    from detfocal.config import config_to_dict, data_paths, model_kwargs, shapes_kwargs
    from detfocal.data import load_coco_annotations
    from detfocal.data.shapes import ensure_dataset
    from detfocal.evaluation.analysis import analyze_split, run_focal_parameters, summarize
    from detfocal.utils.registry import DETECTORS

    if shapes_kwargs(cfg) is not None:
        ensure_dataset(**shapes_kwargs(cfg))
    annotations = load_coco_annotations(data_paths(cfg.data)["train"][1])
    ids = sorted(category["id"] for category in annotations["categories"])  # as CocoDetection labels them
    torch.manual_seed(seed)
    # The labels do not depend on the weights: no pretrained backbone is downloaded.
    model = DETECTORS.get(cfg.model.type)(**model_kwargs(cfg, len(ids)) | {"weights_backbone": None}).eval()
    alpha, _ = run_focal_parameters(model, config_to_dict(cfg)["model"].get("head"))
    result = analyze_split(model, cfg, label_to_category_id=ids, num_images=num_images, alpha=alpha,
                           gammas=SHARE_GAMMAS, progress=False)
    summary = summarize(result)
    keys = ("images", "anchors_per_image", "positives_per_image", "ignored_per_image", "negatives_per_image",
            "negatives_per_positive")
    return {**{key: summary[key] for key in keys}, "negative_loss_share": shares(summary)}


def shares(summary: dict[str, Any]) -> dict[str, float | None]:
    """``{"0": share, "2": share}``: the negatives' share of the loss at gamma 0 and 2 of an analysis summary."""
    return {f"{row['gamma']:g}": row["negative_loss_share"] for row in summary["per_gamma"]
            if row["gamma"] in SHARE_GAMMAS}


def measure_point(plan: Plan, point: Point, out: Path) -> dict[str, Any]:
    """:func:`measure_anchors` of a point's FL config, stored in OUT/<point>/anchors.json and read from there after.

    Generates the point's data first where it is missing. The FL config, because its alpha
    (0.25) is the one ``detfocal analyze`` would use on the FL runs.
    """
    path = out / point.name / "anchors.json"
    if path.exists():
        return json.loads(path.read_text())
    cfg = load_config(plan.config, plan.point_overrides(point, out) + setting_overrides(plan.loss_setting("fl", 0)))
    measured = measure_anchors(cfg, plan.images)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, measured)
    return measured


def analyze_run(folder: Path, num_images: int) -> dict[str, Any] | None:
    """``detfocal analyze`` of a finished run's last.pth (the weights of its metrics.json) into folder/analysis.

    Done once: a complete analysis there is read instead.

    Returns:
        The analysis summary, or None while the run has no metrics.json or last.pth.
    """
    from detfocal.evaluation.analysis_plots import OUTPUT_NAMES, write_model_analysis

    analysis = folder / "analysis"
    if all((analysis / name).exists() for name in OUTPUT_NAMES):
        return json.loads((analysis / "summary.json").read_text())
    if not (folder / "metrics.json").exists() or not (folder / "last.pth").exists():
        return None
    from detfocal.engine.loading import load_model

    model, info = load_model(folder / "last.pth")
    summary, _ = write_model_analysis(model, info["config"], analysis, num_images=num_images, overwrite=True,
                                      label_to_category_id=info["label_to_category_id"], progress=False,
                                      metadata={"checkpoint": str(folder / "last.pth"), "iteration": info["iteration"]})
    return summary


def write_json(path: Path, payload: Any) -> Path:
    """``payload`` as indented JSON, written atomically."""
    return atomic_write(path, lambda handle: json.dump(payload, handle, indent=1), binary=False)
