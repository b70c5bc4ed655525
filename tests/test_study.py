"""detfocal study imbalance: one-line argument errors, the measured negatives per positive against a
float64 IoU count, resuming (finished runs are not trained again) and the --quick smoke study."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detfocal.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "shapes_retinanet_r18.yaml"
QUICK_RUNS = [f"{point}/{loss}_seed0" for point in ("q1", "q2") for loss in ("ce", "fl")]


def run_study(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "detfocal", "study", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


# ----------------------------------------------------------------------------------------------
# Arguments and folders


@pytest.mark.parametrize("args, message", [
    (["nope"], "argument study: invalid choice: 'nope'"),
    (["imbalance", "--seeds", "0"], "--seeds: expected an integer >= 1, got '0'"),
    (["imbalance", "--iters", "two"], "--iters: expected an integer >= 1, got 'two'"),
    (["imbalance", "--images", "1.5"], "--images: expected an integer >= 1, got '1.5'"),
    (["imbalance", "--ce-alpha", "1.5"], "--ce-alpha: expected a number in [0, 1], got '1.5'"),
    (["imbalance", "--config", "no_such_config"], "no_such_config"),
    (["imbalance", "--set", "model.head.nope=1"], "point d1 (CE) is not a valid config"),
    (["imbalance", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_one_line_errors_before_any_work(args, message, tmp_path, capsys):
    out = tmp_path / "study"
    assert cli_main(["study", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_a_folder_that_holds_no_study_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli_main(["study", "imbalance", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds no study (no plan.json)" in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------------------------
# The measured negatives per positive


def _anchors_float64(image_size: int, sizes: list[list[int]], ratios: list[float]) -> np.ndarray:
    """Every anchor of a square image, written out from the layout: P3-P7 grids of ceil(size / 2^l) cells
    (stride-2 convolutions), size s and ratio r (height / width) give a box of s / sqrt(r) x s sqrt(r)
    centred on the cell's corner, its half sides rounded to whole pixels (half to even, as torchvision)."""
    boxes = []
    for level, level_sizes in zip(range(3, 8), sizes):
        cells = -(-image_size // 2 ** level)
        stride = image_size // cells
        half = np.array([[s / np.sqrt(r) / 2, s * np.sqrt(r) / 2] for r in ratios for s in level_sizes])
        half = np.round(half)  # numpy rounds half to even, as torch.round
        centres = np.array([(x * stride, y * stride) for y in range(cells) for x in range(cells)], dtype=np.float64)
        for cx, cy in centres:
            boxes.append(np.stack([cx - half[:, 0], cy - half[:, 1], cx + half[:, 0], cy + half[:, 1]], axis=1))
    return np.concatenate(boxes)


def _iou_float64(boxes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """[M, 4] x [N, 4] xyxy -> [M, N], in float64."""
    low = np.maximum(boxes[:, None, :2], anchors[None, :, :2])
    high = np.minimum(boxes[:, None, 2:], anchors[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=2)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    return inter / (area(boxes)[:, None] + area(anchors)[None] - inter)


def test_measured_ratio_equals_a_float64_iou_count(tmp_path):
    """The paper's rule: IoU >= 0.5 positive, < 0.4 negative, between ignored, and each box's best anchors
    (ties included) positive whatever their IoU; counted over the first val images in id order."""
    from detfocal.config import load_config
    from detfocal.study.imbalance import measure_anchors

    # Ratios 1/4, 1, 4: the anchors' sides are exact in float32 too, so only the IoU arithmetic differs.
    sizes = [[16, 20, 25], [32, 40, 50], [64, 80, 101], [128, 161, 203], [256, 322, 406]]
    ratios, num_images = [0.25, 1.0, 4.0], 8
    cfg = load_config(DEMO, [
        f"data.shapes={{root: {tmp_path / 'shapes'}, num_train: 2, num_val: 10, image_size: 64, min_object_size: 8, "
        "max_objects: 4}", "model.min_size=64", "model.max_size=64", "model.fpn_channels=32",
        "model.head.num_convs=1", "model.head.norm=none", f"model.anchor_sizes={sizes}",
        f"model.aspect_ratios={ratios}"])
    measured = measure_anchors(cfg, num_images)

    dataset = json.loads((tmp_path / "shapes" / "annotations" / "instances_val.json").read_text())
    image_ids = sorted(image["id"] for image in dataset["images"])[:num_images]
    anchors = _anchors_float64(64, sizes, ratios)
    positives = negatives = 0
    for image_id in image_ids:
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in
                          (a["bbox"] for a in dataset["annotations"] if a["image_id"] == image_id)], dtype=np.float64)
        if len(boxes) == 0:
            negatives += len(anchors)
            continue
        iou = _iou_float64(boxes.reshape(-1, 4), anchors)
        best = iou.max(axis=0)
        positive = (best >= 0.5) | (iou == iou.max(axis=1, keepdims=True)).any(axis=0)
        positives += int(positive.sum())
        negatives += int(((best < 0.4) & ~positive).sum())
    assert positives > 0
    assert measured["images"] == num_images
    assert measured["anchors_per_image"] == len(anchors) == 86 * 9
    assert measured["positives_per_image"] == pytest.approx(positives / num_images, rel=1e-12)
    assert measured["negatives_per_image"] == pytest.approx(negatives / num_images, rel=1e-12)
    assert measured["negatives_per_positive"] == pytest.approx(negatives / positives, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Resuming


def test_a_second_invocation_trains_only_the_unfinished_runs(tmp_path, monkeypatch, capsys):
    import detfocal.study.command as command

    out = tmp_path / "study"
    trained = []

    def fake_training(config, setting, overrides, out_dir):
        """Stands in for detfocal train: writes the run's metrics.json."""
        trained.append(out_dir.relative_to(out).as_posix())
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = {"AP": 0.01 * len(trained), "AP50": 0.5, "AP75": 0.25}
        (out_dir / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(command, "run_setting", fake_training)
    study = ["study", "imbalance", "--quick", "--out", str(out)]
    assert cli_main(study) == 0
    assert sorted(trained) == sorted(QUICK_RUNS)
    (out / "q2" / "fl_seed0" / "metrics.json").unlink()  # as if interrupted during that run
    trained.clear()
    capsys.readouterr()
    assert cli_main(study) == 0
    assert trained == ["q2/fl_seed0"]
    assert capsys.readouterr().out.count("finished before") == 3
    trained.clear()
    assert cli_main([*study, "--seeds", "2"]) == 0  # another seed: only its runs train
    assert sorted(trained) == sorted(run.replace("seed0", "seed1") for run in QUICK_RUNS)
    capsys.readouterr()
    assert cli_main([*study, "--iters", "3"]) == 2  # another plan would mix incomparable runs
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds a study with another iterations (2, not 3)" in err


def test_a_failed_run_is_reported_and_the_others_still_train(tmp_path, monkeypatch, capsys):
    import detfocal.study.command as command

    out = tmp_path / "study"
    trained = []

    def fake_training(config, setting, overrides, out_dir):
        trained.append(out_dir.relative_to(out).as_posix())
        if trained[-1] == "q1/ce_seed0":
            raise ValueError("training gamma0.0_alpha0.75_seed0 failed (error: non-finite loss)")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps({"AP": 0.5, "AP50": 0.5, "AP75": 0.5}))
        return {"AP": 0.5, "AP50": 0.5, "AP75": 0.5}

    monkeypatch.setattr(command, "run_setting", fake_training)
    assert cli_main(["study", "imbalance", "--quick", "--out", str(out)]) == 2
    assert sorted(trained) == sorted(QUICK_RUNS)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 1 run(s) failed (q1 CE seed 0)") and "run the same command again" in err
    q1 = next(line for line in (out / "table.md").read_text().splitlines() if line.startswith("| q1 "))
    assert [cell.strip() for cell in q1.split("|")][8:11] == ["-", "-", "-"]  # CE s0, mean, range


# ----------------------------------------------------------------------------------------------
# The --quick study, end to end


@pytest.mark.slow
def test_quick_study_writes_the_table_csv_json_and_plot_from_the_runs_metrics(tmp_path):
    out = tmp_path / "quick"
    result = run_study("imbalance", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "[4/4] q2 FL seed 0: AP" in result.stdout
    for name in ("plan.json", "table.md", "study.csv", "study.json", "study.png"):
        assert (out / name).is_file(), name
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every number is a run's own: give each run a distinct AP, then run again (nothing trains).
    stamps = {}
    for index, run in enumerate(QUICK_RUNS):
        path = out / run / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics["AP"] = stamps[run] = 0.1234 + 0.1 * index
        path.write_text(json.dumps(metrics))
    again = run_study("imbalance", "--quick", "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished before") == 4 and "training" not in again.stdout

    table = (out / "table.md").read_text().splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == ["point", "image px", "objects <=", "sizes x ratios", "anchors/image", "positives/image",
                      "neg:pos", "CE s0", "CE mean", "CE range", "FL s0", "FL mean", "FL range", "FL - CE",
                      "neg share g0 (FL)", "neg share g2 (FL)"]
    cells = {line.split("|")[1].strip(): [cell.strip() for cell in line.strip("|").split("|")] for line in table[2:4]}
    with open(out / "study.csv", newline="") as handle:
        rows = {row["point"]: row for row in csv.DictReader(handle)}
    assert set(rows) == set(cells) == {"q1", "q2"}
    for point in ("q1", "q2"):
        anchors = json.loads((out / point / "anchors.json").read_text())
        analysis = json.loads((out / point / "fl_seed0" / "analysis" / "summary.json").read_text())
        shares = {row["gamma"]: row["negative_loss_share"] for row in analysis["per_gamma"]}
        ce, fl = stamps[f"{point}/ce_seed0"], stamps[f"{point}/fl_seed0"]
        row = rows[point]
        assert float(row["ce_ap_seed0"]) == ce and float(row["fl_ap_seed0"]) == fl
        assert float(row["fl_minus_ce"]) == pytest.approx(fl - ce)
        assert float(row["negatives_per_positive"]) == anchors["negatives_per_positive"]
        assert float(row["anchors_per_image"]) == anchors["anchors_per_image"]
        assert float(row["fl_neg_share_gamma0"]) == shares[0.0] and float(row["fl_neg_share_gamma2"]) == shares[2.0]
        assert float(row["init_neg_share_gamma0"]) == anchors["negative_loss_share"]["0"]
        assert cells[point][7] == f"{100 * ce:.1f}" and cells[point][10] == f"{100 * fl:.1f}"
        assert cells[point][6] == f"{anchors['negatives_per_positive']:,.0f}"
    study = json.loads((out / "study.json").read_text())
    assert {(run["point"], run["loss"], run["AP"]) for run in study["runs"]} == {
        (run.split("/")[0], run.split("/")[1][:2], ap) for run, ap in stamps.items()}
