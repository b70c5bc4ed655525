"""``detfocal study imbalance``: the arguments, the plan's checks, and the loop over the runs."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Sequence

from detfocal.ablate import run_setting, setting_overrides
from detfocal.config import load_config, parse_override_value
from detfocal.study import imbalance
from detfocal.study.imbalance import (CE_ALPHA, DEFAULT_CONFIG, FULL_ITERATIONS, LOSS_NAMES, LOSSES, POINTS,
                                      QUICK_POINTS, Plan, analyze_run, measure_point, run_dir, write_json)
from detfocal.study.report import points_table, table_rows, write_outputs

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised as ValueError, which the command layer prints on one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``detfocal study`` parser (standard library only)."""
    parser = _Parser(prog="detfocal study", description=imbalance.__doc__.split("\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=imbalance.__doc__)
    parser.add_argument("study", choices=["imbalance"], help="the study: imbalance (the only one)")
    parser.add_argument("--out", type=Path, help="output folder (default: runs/study_imbalance, "
                                                 "runs/study_imbalance_quick with --quick)")
    parser.add_argument("--seeds", metavar="N",
                        help="train every point with seeds 0 .. N-1 (default 2; 1 with --quick)")
    parser.add_argument("--iters", metavar="N",
                        help=f"iterations per run (default {FULL_ITERATIONS}; 2 with --quick)")
    parser.add_argument("--images", metavar="N",
                        help="val images measured and analysed per point (default 100; 4 with --quick)")
    parser.add_argument("--ce-alpha", default=str(CE_ALPHA), metavar="A",
                        help=f"alpha of the CE runs (default {CE_ALPHA}, the paper's best at gamma 0, Table 1a)")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"the base config, YAML or a shipped name; a shapes config, as every point sets "
                             f"its data.shapes (default {DEFAULT_CONFIG})")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every run after the study's own (e.g. train.amp=off)")
    parser.add_argument("--quick", action="store_true",
                        help="2 tiny points (64 px, 8 training images), 1 seed by default, 2 iterations: 1-2 minutes")
    parser.add_argument("--measure-only", action="store_true",
                        help="generate the data and measure every point's anchors, then stop (about a minute)")
    return parser


def _integer(option: str, text: str | None, default: int, low: int = 1) -> int:
    if text is None:
        return default
    value = parse_override_value(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{option}: expected an integer >= {low}, got {text!r}")
    return value


def make_plan(args: argparse.Namespace) -> tuple[Plan, int]:
    """The plan and the number of seeds of the parsed arguments.

    Raises:
        ValueError: a count below 1, or an alpha outside [0, 1].
        FileNotFoundError: the config does not exist.
    """
    from detfocal.configs import resolve_config_path

    ce_alpha = parse_override_value(args.ce_alpha)
    if isinstance(ce_alpha, bool) or not isinstance(ce_alpha, (int, float)) or not 0 <= ce_alpha <= 1:
        raise ValueError(f"--ce-alpha: expected a number in [0, 1], got {args.ce_alpha!r}")
    seeds = _integer("--seeds", args.seeds, 1 if args.quick else 2)
    plan = Plan(config=str(resolve_config_path(args.config).resolve()), points=QUICK_POINTS if args.quick else POINTS,
                iterations=_integer("--iters", args.iters, 2 if args.quick else FULL_ITERATIONS),
                num_train=8 if args.quick else 1500, num_val=4 if args.quick else 200,
                images=_integer("--images", args.images, 4 if args.quick else 100), ce_alpha=float(ce_alpha),
                overrides=tuple(args.set), quick=args.quick)
    return plan, seeds


def check_folder(out: Path, plan: Plan) -> None:
    """Refuse a folder that holds something other than a study, or a study of another plan.

    Raises:
        ValueError: ``out`` is a file, a non-empty folder without plan.json, or holds a study whose
            plan differs (its runs would not be comparable); the message names the first difference.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, expected a folder")
    saved_path = out / "plan.json"
    if not saved_path.exists():
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"--out {out} is a non-empty folder that holds no study (no plan.json); choose a new "
                             f"or empty folder")
        return
    saved, wanted = json.loads(saved_path.read_text()), plan.as_json()
    for key in wanted:
        if saved.get(key) != wanted[key]:
            raise ValueError(f"--out {out} holds a study with another {key} ({json.dumps(saved.get(key))[:80]}, "
                             f"not {json.dumps(wanted[key])[:80]}); its runs would not compare: choose another --out")


def check_configs(plan: Plan, out: Path) -> None:
    """Load and check every point's CE and FL config before any work, as ``detfocal train`` checks them.

    Raises:
        ValueError: the first that does not load, named with its point and loss.
    """
    from detfocal.config import config_to_dict
    from detfocal.modeling.validate import check_model_config

    for point in plan.points:
        for loss in LOSSES:
            try:
                cfg = load_config(plan.config, plan.point_overrides(point, out) +
                                  setting_overrides(plan.loss_setting(loss, 0)))
                check_model_config(config_to_dict(cfg)["model"], imports=cfg.imports)
            except (ValueError, KeyError) as exc:
                message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
                raise ValueError(f"point {point.name} ({LOSS_NAMES[loss]}) is not a valid config: {message}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``detfocal study imbalance``: measure every point, train what is not finished, write the table and figure."""
    args = build_parser().parse_args(argv)
    plan, seeds = make_plan(args)
    out = (args.out or Path("runs") / ("study_imbalance_quick" if plan.quick else "study_imbalance")).absolute()
    check_folder(out, plan)
    check_configs(plan, out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "plan.json", plan.as_json())
    measured = {}
    for point in plan.points:
        if not (out / point.name / "anchors.json").exists():
            logger.info("%s: generating its data if missing, measuring its anchors on %d val images", point.name,
                        plan.images)
        measured[point.name] = stats = measure_point(plan, point, out)
        logger.info("%s: %d px, objects <= %d, %s sizes x ratios: %.0f anchors/image, %.2f positives/image, "
                    "%.0f negatives per positive", point.name, point.image_size, point.max_objects, point.layout,
                    stats["anchors_per_image"], stats["positives_per_image"], stats["negatives_per_positive"])
    if args.measure_only:
        print(points_table(plan, measured))
        print(f"wrote {', '.join(str(out / point.name / 'anchors.json') for point in plan.points)}")
        return 0
    # Seed-major: a complete first seed over every point comes first.
    runs = [(point, loss, seed) for seed in range(seeds) for point in plan.points for loss in LOSSES]
    results: dict[tuple, dict | None] = {}
    failures, durations = [], []
    for index, (point, loss, seed) in enumerate(runs, 1):
        folder = run_dir(out, point, loss, seed)
        label = f"[{index}/{len(runs)}] {point.name} {LOSS_NAMES[loss]} seed {seed}"
        if (folder / "metrics.json").exists():
            results[(point.name, loss, seed)] = metrics = json.loads((folder / "metrics.json").read_text())
            logger.info("%s: finished before, AP %.1f", label, 100 * metrics["AP"])
            continue
        left = sum(not (run_dir(out, *run) / "metrics.json").exists() for run in runs[index - 1:])
        eta = f", about {max(1, round(sum(durations) / len(durations) * left / 60))} min left" if durations else ""
        logger.info("%s: training %d iterations (%.0f negatives per positive)%s", label, plan.iterations,
                    measured[point.name]["negatives_per_positive"], eta)
        start = time.perf_counter()
        try:
            metrics = run_setting(plan.config, plan.loss_setting(loss, seed), plan.point_overrides(point, out), folder)
        except ValueError as exc:  # a failed run is reported, the others still train
            logger.warning("%s: %s", label, exc)
            failures.append(f"{point.name} {LOSS_NAMES[loss]} seed {seed}")
            continue
        durations.append(time.perf_counter() - start)
        results[(point.name, loss, seed)] = metrics
        logger.info("%s: AP %.1f in %.1f min", label, 100 * metrics["AP"], durations[-1] / 60)
        _report(out, plan, seeds, measured, results)  # an interrupted study still shows what it has
    paths = _report(out, plan, seeds, measured, results)
    print()
    print((out / "table.md").read_text(), end="")
    print(f"wrote {', '.join(str(path) for path in paths)}")
    if failures:
        raise ValueError(f"{len(failures)} run(s) failed ({', '.join(failures)}); see their ablate.log, and run the "
                         f"same command again to retry them")
    return 0


def _report(out: Path, plan: Plan, seeds: int, measured: dict, results: dict) -> list[Path]:
    """Write the outputs of the finished runs, analysing each point's first-seed FL model once it is trained."""
    analyses = {point.name: analyze_run(run_dir(out, point, "fl", 0), plan.images) for point in plan.points}
    runs = []
    for point in plan.points:
        for loss in LOSSES:
            for seed in range(seeds):
                metrics = results.get((point.name, loss, seed))
                runs.append({"point": point.name, "loss": loss, "seed": seed,
                             "folder": str(run_dir(out, point, loss, seed)),
                             **({key: metrics[key] for key in ("AP", "AP50", "AP75")} if metrics else {})})
    return write_outputs(out, plan, seeds, table_rows(plan, seeds, measured, results, analyses), runs)
