"""detfocal ablate: a grid of short trainings through detfocal train, written as the paper's Table 1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detfocal.ablate import parse_grid
from detfocal.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "shapes_retinanet_r18.yaml"


def run_ablate(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "detfocal", "ablate", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_grid_values_are_parsed_as_set_values_are():
    grid = parse_grid(["gamma=1e-1,2", "train.amp=off,bf16", "alpha=null"])
    assert grid == {"model.head.gamma": [0.1, 2], "train.amp": ["off", "bf16"], "model.head.alpha": [None]}


@pytest.mark.slow
def test_two_setting_grid_writes_table1_json_and_plot(tmp_path, tiny):
    out = tmp_path / "ablate"
    result = run_ablate(str(DEMO), "--grid", "gamma=0,2", "alpha=0.25", "--out", str(out),
                        "--set", *tiny, "train.max_iters=2")
    assert result.returncode == 0, result.stderr
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| gamma | alpha | AP | AP50 | AP75 |")
    assert len(table) == 4  # header, rule, two settings
    assert table[3].split("|")[-4].strip() == "34.0"  # gamma=2, alpha=.25: the paper's 34.0 AP
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [row["setting"]["model.head.gamma"] for row in rows] == [0, 2]
    for row in rows:  # each number is the run's own final evaluation
        metrics = json.loads((out / f"gamma{row['setting']['model.head.gamma']}_alpha0.25" / "metrics.json").read_text())
        assert row["AP"] == metrics["AP"]
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Finished settings are not trained again: a rerun only rewrites the table.
    again = run_ablate(str(DEMO), "--grid", "gamma=0,2", "alpha=0.25", "--out", str(out),
                       "--set", *tiny, "train.max_iters=2")
    assert again.returncode == 0 and "wrote" in again.stdout


@pytest.mark.parametrize("grid, message", [(["gamma"], "KEY=V1,V2"), (["gamma=0", "gamma=1"], "twice"),
                                           (["model.head.nope=1"], "nope")])
def test_bad_grid_is_one_line_error(grid, message, capsys):
    assert cli_main(["ablate", str(DEMO), "--grid", *grid]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


@pytest.mark.parametrize("grid, message", [
    (["gamma=0,2,-1"],
     "grid point gamma-1 (model.head.gamma=-1) is not a valid config: model.head.gamma: expected >= 0"),
    (["gamma=0,2", "train.amp=off,fp17"], "grid point gamma0_ampfp17"),
])
def test_every_grid_point_is_checked_before_any_training(tmp_path, capsys, monkeypatch, grid, message):
    import detfocal.ablate as ablate

    monkeypatch.setattr(ablate, "run_setting", lambda *args: pytest.fail("a grid point was trained"))
    out = tmp_path / "ablate"
    assert cli_main(["ablate", str(DEMO), "--grid", *grid, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: --grid: {message}"), err
    assert not out.exists()
