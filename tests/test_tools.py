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
               "train.batch_size=1", "train.epochs=10000", "eval.interval=10000"]
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
        assert "saved last.pth at the end of epoch" in err and last >= 16


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
             "model.fpn_channels=32", "model.head.norm=none", "model.head.num_convs=1", "train.batch_size=4",
             "train.epochs=1",
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
    for command in ("train", "eval", "infer", "export", "subset", "shapes", "benchmark", "ablate", "study",
                    "plot-focal"):
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


# ---------------------------------------------------------------------------------------------
# eval, infer and the checkpoints they read: refused in one line, inputs and outputs intact


def untrained_checkpoint(path: Path, tiny: list[str], **changes) -> Path:
    """A checkpoint with the keys ``detfocal train`` writes, of the untrained tiny model (no training: fast).

    ``changes`` replace stored fields, as a crafted or broken file would.
    """
    from detfocal.config import config_to_dict, model_kwargs
    from detfocal.data.shapes import CATEGORIES
    from detfocal.engine.checkpoint import save_checkpoint
    from detfocal.utils.registry import DETECTORS

    cfg = load_config(DEMO, tiny)
    model = DETECTORS.get(cfg.model.type)(**model_kwargs(cfg, len(CATEGORIES)))
    state = {"model": model.state_dict(), "config": config_to_dict(cfg), "num_classes": len(CATEGORIES),
             "label_to_category_id": [category[0] for category in CATEGORIES],
             "category_names": [category[1] for category in CATEGORIES], "iteration": 0, "epoch": 0}
    return save_checkpoint(path, state | changes)


def write_image(path: Path, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_infer_never_writes_over_an_input_and_replaces_other_files_only_with_overwrite(tmp_path, tiny, capsys,
                                                                                     one_thread):
    checkpoint = str(untrained_checkpoint(tmp_path / "model.pth", tiny))
    photos = tmp_path / "photos"
    photos.mkdir()
    holiday, cat = write_image(photos / "holiday.png"), write_image(photos / "cat.jpg", seed=1)
    (photos / "cat.png").write_bytes(b"an unrelated picture of my cat")
    (tmp_path / "link").symlink_to(photos)
    before = {path.name: path.read_bytes() for path in photos.iterdir()}

    # holiday.png's drawing would be holiday.png itself: refused, with --overwrite too, however --out is spelled.
    for out, extra in ((photos, []), (photos, ["--overwrite"]), (tmp_path / "link", ["--overwrite"])):
        assert cli_main(["infer", checkpoint, str(holiday), str(cat), "--out", str(out), *extra]) == 2
        assert one_error_line(capsys) == (f"error: --out: the drawing of {holiday} would replace the input image "
                                          f"{holiday}; choose another --out folder")
        assert {path.name: path.read_bytes() for path in photos.iterdir()} == before

    # cat.jpg's drawing would replace an unrelated cat.png: only with --overwrite.
    assert cli_main(["infer", checkpoint, str(cat), "--out", str(photos)]) == 2
    assert one_error_line(capsys).startswith(f"error: --out: {photos / 'cat.png'} exists (the drawing of {cat} would "
                                             f"replace it); pass --overwrite")
    assert {path.name: path.read_bytes() for path in photos.iterdir()} == before
    assert cli_main(["infer", checkpoint, str(cat), "--out", str(photos), "--overwrite", "--min-draw-size", "0"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"-> {photos / 'cat.png'}")
    assert is_png(photos / "cat.png") and Image.open(photos / "cat.png").size == (48, 40)
    assert holiday.read_bytes() == before["holiday.png"] and cat.read_bytes() == before["cat.jpg"]


@pytest.mark.parametrize("renamed, message", [
    ({"category_names": ["circle", "box", "triangle", "star", "ring"]},
     "(classes are matched by id): another name for 1 id(s): 3 'box' (annotations: 'square')"),
    ({"num_classes": 4, "label_to_category_id": [1, 3, 7, 12],
      "category_names": ["circle", "square", "triangle", "star"]},
     "1 categorie(s) of the annotations are not the model's and are left out: 20 'ring'"),
])
def test_eval_warns_listing_the_categories_that_differ_from_the_annotations(tmp_path, tiny, capsys, one_thread,
                                                                            renamed, message):
    from detfocal.data import shapes

    shapes.generate(tmp_path / "shapes", num_train=8, num_val=4, image_size=64, min_object_size=6, max_objects=3)
    if "num_classes" in renamed:  # a model of 4 classes: weights of their own shapes
        from detfocal.config import model_kwargs
        from detfocal.utils.registry import DETECTORS

        cfg = load_config(DEMO, tiny)
        renamed = renamed | {"model": DETECTORS.get(cfg.model.type)(**model_kwargs(cfg, 4)).state_dict()}
    checkpoint = untrained_checkpoint(tmp_path / "model.pth", tiny, **renamed)
    assert cli_main(["eval", str(checkpoint), "--out-dir", str(tmp_path / "eval")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "categories" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"the categories of checkpoint {checkpoint} differ from "
                                                         f"those of {tmp_path / 'shapes'}")
    assert message in warnings[0]
    assert (tmp_path / "eval" / "metrics.json").is_file()


def test_eval_refuses_annotations_that_share_no_category_name_with_the_checkpoint(tmp_path, tiny, capsys, one_thread):
    from detfocal.data import shapes

    shapes.generate(tmp_path / "shapes", num_train=8, num_val=4, image_size=64, min_object_size=6, max_objects=3)
    checkpoint = untrained_checkpoint(tmp_path / "model.pth", tiny, category_names=["cat", "dog", "cow", "owl", "bee"])
    assert cli_main(["eval", str(checkpoint), "--out-dir", str(tmp_path / "eval")]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: checkpoint {checkpoint} does not fit the annotations "
                          f"{tmp_path / 'shapes' / 'annotations' / 'instances_val.json'}: no category has the same id "
                          f"and name in both (classes are matched by id); checkpoint: 1 'cat', 3 'dog'")
    assert "annotations: 1 'circle', 3 'square'" in err
    assert not (tmp_path / "eval" / "metrics.json").exists()


@pytest.mark.parametrize("tool", ["eval", "infer", "infer-image"])
def test_a_folder_given_as_checkpoint_or_image_is_called_a_folder(tmp_path, capsys, tool):
    folder = tmp_path / "run"
    folder.mkdir()
    image = write_image(tmp_path / "a.png")
    argv = {"eval": ["eval", str(folder)], "infer": ["infer", str(folder), str(image), "--out", str(tmp_path / "out")],
            "infer-image": ["infer", str(tmp_path / "none.pth"), str(folder), "--out", str(tmp_path / "out")]}[tool]
    assert cli_main(argv) == 2
    expected = (f"error: image {folder} is a folder, expected a PNG or JPEG file" if tool == "infer-image" else
                f"error: checkpoint {folder} is a folder, expected a .pth file")
    assert one_error_line(capsys) == expected


@pytest.mark.parametrize("changes, message", [
    ({"model": "weights"}, "'model' holds a str, expected a state dict (parameter name -> tensor)"),
    ({"model": {"head.weight": [1.0]}}, "'model' is not a state dict: 1 entries are not name -> tensor"),
    ({"ema": "weights"}, "'ema' holds a str, expected a state dict"),
    ({"config": "model: {}"}, "'config' holds a str, expected a dict"),
    ({"num_classes": 10 ** 7}, "num_classes: expected an int in [1, 100000], got 10000000"),
    ({"num_classes": "5"}, "num_classes: expected an int in [1, 100000], got '5'"),
    ({"num_classes": 6}, "label_to_category_id: expected 6 distinct int ids (num_classes), got [1, 3, 7, 12, 20]"),
    ({"label_to_category_id": [1, 1, 7, 12, 20]}, "label_to_category_id: expected 5 distinct int ids"),
    ({"category_names": ["circle"]}, "category_names: expected 5 names (num_classes), got ['circle']"),
    ({"iteration": "ten"}, "iteration: expected an int, got 'ten'"),
])
def test_a_crafted_checkpoint_is_one_line_naming_the_field(tmp_path, tiny, capsys, changes, message):
    checkpoint = untrained_checkpoint(tmp_path / "crafted.pth", tiny, **changes)
    image = write_image(tmp_path / "a.png")
    assert cli_main(["infer", str(checkpoint), str(image), "--out", str(tmp_path / "out")]) == 2
    assert one_error_line(capsys).startswith(f"error: checkpoint {checkpoint}: {message}")
    assert not (tmp_path / "out" / "a.png").exists()


def test_a_checkpoint_describing_a_huge_model_is_refused_before_it_is_allocated(tmp_path, tiny):
    # Small weights, but fields within their bounds that describe a huge model: 100,000 classes on
    # a 4096-channel FPN take over 100 GB. In a process limited to 8 GB of address space, building
    # it first would fail with an allocation traceback; checked first, it is a one-line refusal.
    num_classes = 100_000
    checkpoint = untrained_checkpoint(tmp_path / "huge.pth", tiny, num_classes=num_classes,
                                      label_to_category_id=list(range(1, num_classes + 1)),
                                      category_names=[f"class{i}" for i in range(num_classes)])
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["model"]["fpn_channels"] = 4096
    torch.save(state, checkpoint)
    image = write_image(tmp_path / "a.png")
    limited = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30)); "
               "from detfocal.cli import main; sys.exit(main(sys.argv[1:]))")
    result = run_tool("-c", limited, "infer", str(checkpoint), str(image), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: checkpoint {checkpoint} does not fit the model; shape differs")


@pytest.mark.parametrize("kind, message", [
    ("text", "cannot be read with weights_only=True"),
    ("truncated", "cannot be read with weights_only=True"),
    ("list", "holds a list that is not a state dict (parameter name -> tensor) of resnet18"),
    ("grey", "is not a resnet18 state dict: 1 tensors have another shape (file vs resnet18), e.g. conv1.weight "
             "(64, 1, 7, 7) vs (64, 3, 7, 7)"),
    ("folder", "is a folder, expected a .pth state dict file"),
])
def test_a_bad_weights_backbone_file_is_one_line(tmp_path, tiny, capsys, kind, message):
    path = tmp_path / "backbone.pth"
    if kind == "text":
        path.write_text("these are not weights")
    elif kind == "truncated":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "list":
        torch.save([torch.zeros(3)], path)
    elif kind == "grey":  # a one-channel ResNet-18: same keys, another first conv
        state = torchvision.models.resnet18().state_dict()
        state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
        torch.save(state, path)
    else:
        path.mkdir()
    code = cli_main(["train", str(DEMO), "--output-dir", str(tmp_path / "run"), "--set", *tiny,
                     f"model.weights_backbone={path}"])
    err = one_error_line(capsys)
    assert code == 2 and message in err, err
    assert f"weights_backbone={str(path)!r}" in err or f"weights_backbone: {str(path)!r}" in err


# ---------------------------------------------------------------------------------------------
# tools/gpu_check.sh: the one-shot check of the CUDA path (docs/how-to/gpu-check.md)


def run_gpu_check(*args: str, tmp_path: Path, hide_cuda: bool = False) -> subprocess.CompletedProcess:
    """``bash tools/gpu_check.sh ARGS`` as the user runs it; its run folders go to tmp_path (TMPDIR)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHON": sys.executable,
           "TMPDIR": str(tmp_path)}
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(["bash", "tools/gpu_check.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_gpu_check_refuses_in_one_line_without_a_cuda_device(tmp_path):
    result = run_gpu_check("--json", str(tmp_path / "check.json"), tmp_path=tmp_path, hide_cuda=True)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --cases gpu: no CUDA device here (torch.cuda.is_available() is False); "
                                     "the GPU check needs one (--device cpu --quick runs it dry on the CPU)")
    assert not (tmp_path / "check.json").exists() and "GPU check" not in result.stdout


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu_prints_one_table_and_writes_json(tmp_path):
    out = tmp_path / "check.json"
    # CUDA hidden: on a GPU machine too, the dry run is the CPU's (its tests skipped, its runs on the CPU).
    result = run_gpu_check("--device", "cpu", "--quick", "--json", str(out), tmp_path=tmp_path, hide_cuda=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert table[:2] == ["| check | setting | result | target | verdict |", "|---|---|---|---|---|"]
    rows = table[2:]
    checks = [line.split(" | ")[0].strip("| ") for line in rows]
    # The step rows: fp32, and train.amp auto's choice where it is not fp32 (bf16 on a CPU with AVX-512-BF16).
    assert checks[:12] == ["tests"] + ["loss"] * 9 + ["train"] * 2 and checks[-1] == "nccl"
    assert checks[12:-1] in (["step"], ["step"] * 2)
    assert all(line.endswith("| - |") for line in rows), rows  # a dry run: no errors, no targets
    assert "pytest -m cuda test_heads.py" in rows[0] and "skipped" in rows[0]
    assert "skipped: 0 CUDA device(s); the two-process NCCL run needs 2" in rows[-1]
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu" and saved["quick"] is True and saved["table"].splitlines() == table
    details = saved["results"]["gpu"]
    assert [run["amp"] for run in details["train"]] == ["auto", "bf16"]
    assert all(run["iterations"] == 2 and run["finite"] for run in details["train"])
    assert {row["dtype"] for row in details["loss"]} == {"fp32", "fp16", "bf16"}
    assert Path(details["work_dir"]).parent == tmp_path  # the run folders and logs, kept for a look


def test_subset_refuses_an_existing_out_file_without_overwrite(tmp_path, capsys):
    source = Path(__file__).parent / "data" / "instances_val2014_100.json"
    out = tmp_path / "results.json"
    out.write_text("the user's results")
    assert cli_main(["subset", str(source), "--max-images", "3", "--out", str(out)]) == 2
    assert "exists; add --overwrite" in capsys.readouterr().err and out.read_text() == "the user's results"
    assert cli_main(["subset", str(source), "--max-images", "3", "--out", str(out), "--overwrite"]) == 0
    assert len(json.loads(out.read_text())["images"]) == 3


def test_eval_refuses_to_write_into_a_training_runs_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"type": "epoch", "epoch": 0}\n')
    (run / "metrics.json").write_text('{"AP": 0.5}')
    torch.save({"iteration": 1}, run / "last.pth")
    assert cli_main(["eval", str(run / "last.pth"), "--out-dir", str(run)]) == 2
    assert "holds a training run" in capsys.readouterr().err and (run / "metrics.json").read_text() == '{"AP": 0.5}'
