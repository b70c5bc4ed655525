"""The commands (detfocal train|eval|infer|subset, tools/*.py): end to end, distributed, errors, security, real COCO."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from detfocal.cli import main as cli_main
from detfocal.config import load_config
from detfocal.data import make_subset
from detfocal.evaluation.coco import STAT_NAMES

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "shapes_retinanet_r18.yaml"
COCO = ROOT / "configs" / "retinanet_r50_fpn_coco.yaml"
COCO_SAMPLE = next((path for path in (ROOT / "tests" / "data" / "instances_val2014_100.json",
                                      ROOT.parent / "shared" / "data" / "coco_val2014_100" / "instances_val2014_100.json")
                    if path.is_file()), None)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_tool(*args: str, module: bool = False, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a command as the user would, from the repo root; one thread each, for the shared CI cores."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, *(["-m"] if module else []), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE


# ---------------------------------------------------------------------------------------------
# end to end, as subprocesses


@pytest.mark.slow
def test_train_eval_infer_end_to_end(tmp_path, tiny):
    out = tmp_path / "run"
    tiny = tiny + ["train.epochs=2", "train.max_iters=3"]
    result = run_tool("tools/train.py", str(DEMO), "--output-dir", str(out), "--set", *tiny)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "precision: fp32 (set by train.amp)" in result.stdout and "AP50" in result.stdout

    checkpoint = torch.load(out / "last.pth", weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "iteration", "rng", "best_ap", "skipped_steps", "config",
            "num_classes", "label_to_category_id", "category_names"} <= set(checkpoint)
    assert (checkpoint["epoch"], checkpoint["iteration"], checkpoint["num_classes"]) == (1, 3, 5)
    assert checkpoint["label_to_category_id"] == [1, 3, 7, 12, 20]
    assert checkpoint["config"]["train"]["max_iters"] == 3
    assert torch.load(out / "best.pth", weights_only=True)["best_ap"] == checkpoint["best_ap"]

    logged = records(out / "metrics.jsonl")
    steps = [r for r in logged if r["type"] == "train"]
    epochs = [r for r in logged if r["type"] == "epoch"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] == pytest.approx(r["classification"] + r["bbox_regression"])
               for r in steps)
    assert [r["epoch"] for r in epochs] == [0, 1] and all(set(STAT_NAMES) <= set(r) for r in epochs)
    for name in ("loss.png", "ap.png", "pr_curves.png", "per_class_ap.png"):
        assert is_png(out / name), name
    assert isinstance(json.loads((out / "results.json").read_text()), list)

    evaluated = tmp_path / "eval"
    result = run_tool("detfocal", "eval", str(out / "last.pth"), "--out-dir", str(evaluated), module=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "per-class AP" in result.stdout and "circle" in result.stdout
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert set(STAT_NAMES) <= set(metrics) and set(metrics["per_class"]) == {"circle", "square", "triangle", "star", "ring"}
    assert metrics["AP"] == pytest.approx(epochs[-1]["AP"])  # the same model on the same images
    results = json.loads((evaluated / "results.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score"} <= set(r) for r in results)
    assert {r["category_id"] for r in results} <= {1, 3, 7, 12, 20}
    assert is_png(evaluated / "pr_curves.png") and is_png(evaluated / "per_class_ap.png")

    images = sorted((tmp_path / "shapes" / "val").glob("*.png"))[:2]
    result = run_tool("detfocal", "infer", str(out / "last.pth"), *map(str, images), "--out", str(tmp_path / "drawn"),
                      "--score-thresh", "0.0", module=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.splitlines()) == 2
    for image in images:
        drawn = tmp_path / "drawn" / image.name
        # 64 px inputs are drawn 8x larger, up to the default --min-draw-size of 512.
        assert is_png(drawn) and Image.open(drawn).size == tuple(8 * side for side in Image.open(image).size)
    result = run_tool("tools/infer.py", str(out / "last.pth"), str(images[0]), "--out", str(tmp_path / "same"),
                      "--min-draw-size", "0")
    assert result.returncode == 0 and Image.open(tmp_path / "same" / images[0].name).size == Image.open(images[0]).size


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny):
    # A frozen-BatchNorm backbone (as with pretrained weights): trainable BatchNorm would see
    # one image per process instead of two, and so would compute different statistics.
    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    common = tiny + [f"model.weights_backbone={weights}", "data.augment={hflip: 0.0}",
                                                    "train.max_iters=2", "train.patience=5"]  # patience: a collective
    single = run_tool("tools/train.py", str(DEMO), "--output-dir", str(tmp_path / "one"), "--set", *common,
                      "train.batch_size=2")
    assert single.returncode == 0, single.stderr[-2000:]
    double = run_tool("torch.distributed.run", "--standalone", "--nproc_per_node=2", "tools/train.py", str(DEMO),
                      "--output-dir", str(tmp_path / "two"), "--set", *common, "train.batch_size=1", module=True)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "batch 1 x 2 process(es)" in double.stdout
    assert double.stdout.count("precision:") == 1  # only rank 0 prints

    first_one = records(tmp_path / "one" / "metrics.jsonl")[0]
    two = records(tmp_path / "two" / "metrics.jsonl")
    first_two = two[0]
    assert first_one["step"] == first_two["step"] == 1
    for key in ("loss", "classification", "bbox_regression"):
        assert first_two[key] == pytest.approx(first_one[key], rel=1e-4), key
    assert [r["step"] for r in two if r["type"] == "train"] == [1, 2]  # one writer: rank 0
    epoch = [r for r in two if r["type"] == "epoch"][-1]
    assert "AP" in epoch  # evaluation gathered the two halves of the val set
    assert torch.load(tmp_path / "two" / "last.pth", weights_only=True)["iteration"] == 2


@pytest.mark.slow
def test_ctrl_c_saves_a_resumable_checkpoint_and_exits_130(tmp_path, tiny):
    out = tmp_path / "run"
    command = [sys.executable, "tools/train.py", str(DEMO), "--output-dir", str(out), "--set", *tiny,
               "train.batch_size=1", "train.epochs=100000", "eval.interval=100000"]
    # SIGINT restored to its default in the child: shells ignore it in background jobs, and a
    # Python started with SIGINT ignored would never raise KeyboardInterrupt.
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pth").exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err[-2000:]
    assert "stopping after this step" in err
    last = torch.load(out / "last.pth", weights_only=True)["iteration"]
    if "interrupted: saved" in err:  # mid-epoch: a checkpoint at that step
        assert torch.load(out / "interrupted.pth", weights_only=True)["iteration"] > last >= 8
    else:  # the step ended an epoch: last.pth is that step
        assert "stopped at the end of epoch" in err and last >= 16


# ---------------------------------------------------------------------------------------------
# errors and --print-config


@pytest.mark.slow
def test_bad_config_key_exits_2_with_one_line():
    result = run_tool("tools/train.py", str(DEMO), "--set", "train.lrr=0.1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: unknown key train.lrr (did you mean train.lr?)")


@pytest.mark.parametrize("tool, argv, message", [
    ("train", ["{missing}"], "error: config file {missing} does not exist"),
    ("train", ["{bad_type}"], "error: train.epochs: expected int, got 'ten' (str)"),
    ("train", ["{demo}", "--set", "train.lr"], "error: --set 'train.lr': expected KEY=VALUE"),
    ("train", ["{demo}", "--set", "data.shapes=null", "data.train.images={tmp}", "data.train.annotations=/no/such.json",
               "data.val.images={tmp}", "data.val.annotations=/no/such.json"],
     "error: annotation_file: /no/such.json does not exist"),
    ("train", ["{demo}", "--set", "data.shapes=null"], "error: data.train: needs 'images' and 'annotations' paths"),
    ("train", ["{demo}", "--output-dir", "{tmp}", "--resume"],
     "error: --resume: {tmp} has no last.pth or interrupted.pth to continue from"),
    ("train", ["{demo}", "--set", "model.head.gamma=-1"], "error: model.head.gamma: expected >= 0, got -1 (int)"),
    ("eval", ["{tmp}/none.pth"], "error: checkpoint {tmp}/none.pth does not exist"),
    ("infer", ["{tmp}/none.pth", "{tmp}/none.png", "--out", "{tmp}"], "error: image {tmp}/none.png does not exist"),
    ("infer", ["{tmp}/none.pth", "{tmp}/none.png", "--out", "{tmp}", "--min-draw-size", "-1"],
     "error: --min-draw-size: expected pixels in [0, 4096], got -1"),
    ("infer", ["{tmp}/none.pth", "{tmp}/none.png", "--out", "{tmp}", "--min-draw-size", "100000000"],
     "error: --min-draw-size: expected pixels in [0, 4096], got 100000000"),
    ("train", ["{demo}", "--output-dir", "{tmp}/bad_type.yaml"], "error: --output-dir {tmp}/bad_type.yaml is a file"),
    ("eval", ["{tmp}/bad_type.yaml"], "error: checkpoint {tmp}/bad_type.yaml cannot be read with weights_only=True"),
    ("subset", ["{tmp}/bad_type.yaml", "--out", "{tmp}/bad_type.yaml"], "error: --out {tmp}/bad_type.yaml is the input"),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, tool, argv, message):
    (tmp_path / "bad_type.yaml").write_text("_base_: " + str(DEMO) + "\ntrain: {epochs: ten}\n")
    names = {"missing": tmp_path / "missing.yaml", "bad_type": tmp_path / "bad_type.yaml", "demo": DEMO, "tmp": tmp_path}
    argv = [arg.format(**names) for arg in argv]
    if tool == "train" and "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "run")]  # not ./runs, which may hold the user's demo run
    code = cli_main([tool, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(message.format(**names)), err


def test_print_config_prints_the_resolved_yaml(capsys):
    code = cli_main(["train", str(DEMO), "--print-config", "--set", "model.head.gamma=1.5",
                                         "data.subset.categories=[circle,star]"])
    printed = capsys.readouterr().out
    assert code == 0
    tree = yaml.safe_load(printed)
    assert tree["model"]["head"]["gamma"] == 1.5 and tree["data"]["subset"]["categories"] == ["circle", "star"]
    assert tree == yaml.safe_load(yaml.safe_dump(tree))
    expected = load_config(DEMO, ["model.head.gamma=1.5", "data.subset.categories=[circle,star]"])
    assert printed.startswith("model:\n") and expected.model.head["gamma"] == 1.5


def test_ablation_inherits_the_demo_and_changes_only_the_head():
    base = load_config(DEMO)
    ablation = load_config(ROOT / "configs" / "ablations" / "shapes_gamma0.yaml")
    assert (ablation.model.head["gamma"], ablation.model.head["alpha"]) == (0.0, 0.75)
    assert ablation.train == base.train and ablation.data == base.data and ablation.model.backbone == base.model.backbone


# ---------------------------------------------------------------------------------------------
# the real COCO annotation structure: 80 categories with id gaps, crowd boxes, odd sizes


@pytest.mark.slow
@pytest.mark.skipif(COCO_SAMPLE is None, reason="instances_val2014_100.json not found")
def test_train_and_eval_on_the_coco_val2014_sample(tmp_path, capsys, one_thread):
    full = json.loads(COCO_SAMPLE.read_text())
    crowd_images = sorted({a["image_id"] for a in full["annotations"] if a["iscrowd"]})[:3]
    other_images = [image["id"] for image in full["images"] if image["id"] not in crowd_images][:5]
    subset = make_subset(full, image_ids=crowd_images + other_images)
    (tmp_path / "instances.json").write_text(json.dumps(subset))
    rng = np.random.default_rng(0)
    for image in subset["images"]:  # placeholders at the listed sizes: only the structure is real
        pixels = np.full((image["height"], image["width"], 3), rng.integers(0, 256, size=3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / image["file_name"], quality=90)

    data = [f"data.{split}={{images: {tmp_path}, annotations: {tmp_path / 'instances.json'}}}" for split in ("train", "val")]
    small = ["model.backbone=resnet18", "model.weights_backbone=null", "model.min_size=128", "model.max_size=192",
             "model.fpn_channels=32", "model.head.num_convs=1", "train.batch_size=4", "train.epochs=1",
             "train.max_iters=2", "train.warmup_iters=1", "train.amp=off", "data.workers=0", "eval.batch_size=4",
             "eval.score_thresh=0.0"]  # after two steps every score is still near the 0.01 prior
    out = tmp_path / "run"
    assert cli_main(["train", str(COCO), "--output-dir", str(out), "--set", *data, *small]) == 0
    checkpoint = torch.load(out / "last.pth", weights_only=True)
    assert checkpoint["num_classes"] == 80 and len(checkpoint["label_to_category_id"]) == 80
    assert checkpoint["label_to_category_id"][-1] == 90  # ids keep their gaps; labels are 0..79

    capsys.readouterr()
    assert cli_main(["eval", str(out / "last.pth"), "--out-dir", str(tmp_path / "eval")]) == 0
    assert "8 images" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(STAT_NAMES) <= set(metrics) and len(metrics["per_class"]) == 80
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    category_ids = {category["id"] for category in full["categories"]}
    assert results and {r["category_id"] for r in results} <= category_ids
    assert {r["image_id"] for r in results} <= set(crowd_images + other_images)


# ---------------------------------------------------------------------------------------------
# the command line itself, and what a checkpoint may not do


def test_help_lists_every_command_without_importing_torch():
    result = run_tool("-X", "importtime", "-m", "detfocal", "--help")
    assert result.returncode == 0
    for command in ("train", "eval", "infer", "export", "subset", "shapes", "benchmark", "ablate", "plot-focal"):
        assert f"    {command}" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "detfocal.config" not in imported


def test_tools_scripts_are_the_same_commands(tmp_path):
    result = run_tool("tools/train.py", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: detfocal train")
    result = run_tool("tools/benchmark.py", "--help")
    assert result.returncode == 0 and "usage: detfocal benchmark" in result.stdout


def test_subset_refuses_to_overwrite_its_input(tmp_path, capsys):
    source = tmp_path / "instances.json"
    text = json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]})
    source.write_text(text)
    assert cli_main(["subset", str(source), "--out", str(tmp_path / "." / "instances.json")]) == 2
    assert "is the input" in capsys.readouterr().err and source.read_text() == text


@pytest.mark.slow
def test_a_checkpoint_never_imports_code_or_generates_data(tmp_path, tiny, capsys, monkeypatch, one_thread):
    out = tmp_path / "run"
    assert cli_main(["train", str(DEMO), "--output-dir", str(out), "--set", *tiny, "train.max_iters=1"]) == 0
    state = torch.load(out / "last.pth", weights_only=True)
    # A crafted checkpoint: its config imports a module next to the user, and points the shapes
    # data at a folder that does not exist (evaluating would generate it).
    (tmp_path / "evil_module.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    state["config"]["imports"] = ["evil_module"]
    state["config"]["data"]["shapes"]["root"] = str(tmp_path / "elsewhere")
    torch.save(state, tmp_path / "crafted.pth")
    capsys.readouterr()
    assert cli_main(["eval", str(tmp_path / "crafted.pth"), "--out-dir", str(tmp_path / "eval")]) == 2
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "elsewhere").exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    images = sorted((tmp_path / "shapes" / "val").glob("*.png"))[:1]
    assert cli_main(["infer", str(tmp_path / "crafted.pth"), str(images[0]), "--out", str(tmp_path / "drawn")]) == 0
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_infer_reads_16_bit_png_as_float(tmp_path, tiny, capsys, one_thread):
    out = tmp_path / "run"
    assert cli_main(["train", str(DEMO), "--output-dir", str(out), "--set", *tiny, "train.max_iters=1"]) == 0
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    assert cli_main(["infer", str(out / "last.pth"), str(tmp_path / "deep.png"), "--out", str(tmp_path / "drawn"),
                     "--min-draw-size", "0"]) == 0
    drawn = np.asarray(Image.open(tmp_path / "drawn" / "deep.png"))
    assert drawn.shape == (64, 64, 3) and drawn.max() >= 250  # the full 16-bit range, not clipped at 255/65535


def test_import_detfocal_is_cheap_and_every_public_name_resolves():
    result = run_tool("-X", "importtime", "-c", "import detfocal")
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert result.returncode == 0 and "torch" not in imported
    import detfocal

    for name in detfocal.__all__:
        assert getattr(detfocal, name) is not None, name
