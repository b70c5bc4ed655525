"""Run short trainings over a grid of settings and write the paper's Table 1 for them.

    detfocal ablate configs/shapes_retinanet_r18.yaml --grid gamma=0,0.5,1,2,5 alpha=0.25,0.5,0.75
    detfocal ablate CONFIG --grid gamma=0,2 alpha=0.25 --set train.epochs=2 --out runs/ablate

Every grid point is one run of ``detfocal train`` (in its own process) with
``--set model.head.<key>=<value>``; ``gamma`` and ``alpha`` are shorthands for the head's
keys, any dotted config key works too. Values are parsed exactly as ``--set`` values are. Writes OUT/table.md (AP, AP50, AP75 per setting
next to the paper's COCO numbers where it reports the same setting), OUT/ablation.json and
OUT/ablation.png. A finished grid point (its metrics.json exists) is not trained again, so an
interrupted ablation resumes where it stopped.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from detfocal.config import load_config, parse_override_value
from detfocal.utils.io import atomic_write, write_json_atomic

logger = logging.getLogger(__name__)

SHORTHANDS = {"gamma": "model.head.gamma", "alpha": "model.head.alpha", "normalization": "model.head.normalization"}
# Lin et al. 2017, Table 1 (ResNet-50-FPN, 600 px, COCO minival): (gamma, alpha) -> (AP, AP50, AP75).
PAPER_TABLE1: dict[tuple[float, float], tuple[float, float | None, float | None]] = {
    (0.0, 0.75): (31.1, 49.4, 33.0),
    (0.5, 0.5): (32.9, None, None),
    (1.0, 0.25): (33.7, None, None),
    (2.0, 0.25): (34.0, 52.5, 36.5),
    (5.0, 0.25): (32.2, None, None),
}


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["gamma=0,2", "alpha=0.25"]`` -> ``{"model.head.gamma": [0.0, 2.0], "model.head.alpha": [0.25]}``."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--grid: expected KEY=V1,V2,..., got {item!r}")
        key = SHORTHANDS.get(key, key)
        if key in grid:
            raise ValueError(f"--grid: key {key!r} given twice")
        grid[key] = [parse_override_value(v) for v in values.split(",")]
    if not grid:
        raise ValueError("--grid: give at least one KEY=V1,V2,...")
    return grid


def grid_settings(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in order: ``{key: value}`` per run."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*grid.values())]


def setting_overrides(setting: dict[str, Any]) -> list[str]:
    """``--set`` items of one grid point, each value written as JSON (which ``--set`` parses as YAML)."""
    return [f"{key}={json.dumps(value)}" for key, value in setting.items()]


def check_settings(config: str, settings: list[dict[str, Any]], overrides: Sequence[str]) -> None:
    """Load and check the config of every grid point before training any, so a bad value fails in seconds.

    Each one is checked as ``detfocal train`` checks it before any work: the config itself,
    then the model section against the registries and the head's signature.

    Raises:
        ValueError, KeyError, FileNotFoundError: the first grid point whose config does not load,
            named with its run name and the config's own message.
    """
    from detfocal.config import config_to_dict
    from detfocal.modeling.validate import check_model_config

    for setting in settings:
        try:
            cfg = load_config(config, [*overrides, *setting_overrides(setting)])
            check_model_config(config_to_dict(cfg)["model"], imports=cfg.imports)
        except (ValueError, KeyError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise ValueError(f"--grid: grid point {run_name(setting)} ({', '.join(setting_overrides(setting))}) "
                             f"is not a valid config: {message}") from None


def run_name(setting: dict[str, Any]) -> str:
    return "_".join(f"{key.rsplit('.', 1)[-1]}{value}" for key, value in setting.items())


def run_setting(config: str, setting: dict[str, Any], overrides: Sequence[str], out_dir: Path) -> dict[str, Any]:
    """Train one grid point (unless already done) and return its final evaluation."""
    metrics_json = out_dir / "metrics.json"
    if not metrics_json.exists():
        sets = [*overrides, *setting_overrides(setting)]
        command = [sys.executable, "-m", "detfocal", "train", config, "--output-dir", str(out_dir), "--overwrite",
                   "--set", *sets]
        proc = subprocess.run(command, text=True, capture_output=True)
        (out_dir / "ablate.log").parent.mkdir(parents=True, exist_ok=True)
        (out_dir / "ablate.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ValueError(f"training {run_name(setting)} failed ({last}); see {out_dir / 'ablate.log'}")
        if not metrics_json.exists():
            raise ValueError(f"training {run_name(setting)} wrote no {metrics_json}; see {out_dir / 'ablate.log'}")
    return json.loads(metrics_json.read_text())


def table1(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """Markdown in the layout of the paper's Table 1, with the paper's COCO numbers alongside."""
    names = [key.rsplit(".", 1)[-1] for key in keys]
    header = [*names, "AP", "AP50", "AP75", "paper AP (COCO)", "paper AP50", "paper AP75"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(names) + ["---:"] * 6) + "|"]
    for row in rows:
        gamma = row["setting"].get("model.head.gamma")
        alpha = row["setting"].get("model.head.alpha")
        paper = PAPER_TABLE1.get((float(gamma), float(alpha))) if gamma is not None and alpha is not None else None
        cells = [str(row["setting"][key]) for key in keys]
        cells += [f"{100 * row[name]:.1f}" for name in ("AP", "AP50", "AP75")]
        cells += ["-" if paper is None or value is None else f"{value:.1f}" for value in (paper or (None,) * 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``detfocal ablate`` parser (standard library only)."""
    parser = argparse.ArgumentParser(prog="detfocal ablate", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("config", help="YAML config or the name of a shipped one, e.g. shapes_retinanet_r18")
    parser.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                        help="values to sweep; gamma, alpha and normalization mean model.head.*")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every run (e.g. train.epochs=3)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/ablate_<config name>)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``detfocal ablate``: train every grid point, then write table.md, ablation.json and ablation.png."""
    args = build_parser().parse_args(argv)
    from detfocal.evaluation.plots import plot_ablation

    grid = parse_grid(args.grid)
    keys = list(grid)
    settings = grid_settings(grid)
    check_settings(args.config, settings, args.set)
    out = args.out or Path("runs") / f"ablate_{Path(args.config).stem}"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, setting in enumerate(settings, 1):
        logger.info("[%d/%d] %s", index, len(settings), run_name(setting))
        metrics = run_setting(args.config, setting, args.set, out / run_name(setting))
        rows.append({"setting": setting, **{name: metrics[name] for name in ("AP", "AP50", "AP75")}})
        logger.info("    AP %.1f  AP50 %.1f  AP75 %.1f", 100 * metrics["AP"], 100 * metrics["AP50"],
                    100 * metrics["AP75"])
    text = table1(rows, keys)
    atomic_write(out / "table.md", lambda handle: handle.write(text + "\n"), binary=False)
    write_json_atomic(out / "ablation.json", {"config": args.config, "overrides": args.set, "rows": rows})
    written = plot_ablation(rows, keys, out / "ablation.png")
    print()
    print(text)
    print(f"wrote {out / 'table.md'}, {out / 'ablation.json'}, {written}")
    return 0

