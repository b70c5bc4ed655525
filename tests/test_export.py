"""detfocal.engine.export: the ONNX graph gives PyTorch's detections, and bad input is one line."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detfocal.config import config_to_dict, load_config, model_kwargs
from detfocal.data import load_image, shapes
from detfocal.engine.checkpoint import save_checkpoint
from detfocal.engine.export import export_onnx, run_onnx
from detfocal.engine.loading import load_model
from detfocal.utils.registry import DETECTORS

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "shapes_retinanet_r18.yaml"
NUM_CLASSES = 5
# What the graph must reproduce: ~1e-3 px on boxes of tens of pixels, scores to 1e-4.
BOX_ATOL, BOX_RTOL, SCORE_ATOL = 1e-3, 1e-4, 1e-4


def make_checkpoint(tmp_path: Path, tiny: list[str]) -> Path:
    """A checkpoint as ``detfocal train`` writes it (the keys inference reads), with a head whose scores spread.

    The images are resized in the graph (64 px shapes to min_size 80, max_size 96), and the
    head uses GroupNorm, as the demo config does. A fresh head scores every anchor near its
    prior; random class weights with their mean over the inputs removed (the untrained
    backbone's features share a large common component) give scores of 0.3-0.8 in all five
    classes, so the threshold, top-k and class-wise NMS all have work to do.
    """
    cfg = load_config(DEMO, [*tiny, "model.fpn_channels=64", "model.head.norm=gn", "model.min_size=80",
                             "model.max_size=96", "eval.score_thresh=0.4"])
    model = DETECTORS.get(cfg.model.type)(**model_kwargs(cfg, NUM_CLASSES))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = model.head.classification_head.cls_logits.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
        weight -= weight.mean(dim=(1, 2, 3), keepdim=True)
        model.head.classification_head.cls_logits.bias.fill_(-3.0)
        weight = model.head.regression_head.bbox_reg.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.01)
    return save_checkpoint(tmp_path / "last.pth", {
        "model": model.state_dict(), "config": config_to_dict(cfg), "num_classes": NUM_CLASSES,
        "label_to_category_id": [1, 3, 7, 12, 20], "category_names": ["circle", "square", "triangle", "star", "ring"],
        "iteration": 2, "epoch": 0})


def val_images(tmp_path: Path) -> list[Path]:
    paths = shapes.generate(tmp_path / "shapes", num_train=0, num_val=3, image_size=64, min_object_size=6,
                            max_objects=3)
    return sorted(Path(paths["val_images"]).glob("*.png"))


def one_thread_session(path: Path):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # the cores are shared with other tests
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def match_detections(got: dict[str, np.ndarray], ref: dict[str, torch.Tensor], *, score_floor: float,
                     max_detections: int) -> dict[str, float]:
    """Pair every detection of ``ref`` with one of ``got``: same label, score and box within tolerance.

    Detections whose scores are within ``SCORE_ATOL`` of the threshold, or of the last one kept
    under the ``max_detections`` cap, may be in one list only, and equal scores may come in
    either order; everything scored above that is compared one to one.

    Returns:
        The largest box and score differences of the pairs.
    """
    ref_scores = ref["scores"].numpy()
    floor = score_floor
    if len(ref_scores) == max_detections:
        floor = max(floor, float(ref_scores.min()))
    floor += SCORE_ATOL
    kept_ref = np.flatnonzero(ref_scores > floor)
    kept_got = np.flatnonzero(got["scores"] > floor)
    assert len(kept_ref) == len(kept_got), f"{len(kept_got)} detections scored above {floor}, PyTorch {len(kept_ref)}"
    used = np.zeros(len(got["scores"]), dtype=bool)
    worst = {"boxes": 0.0, "scores": 0.0}
    for i in kept_ref:
        box, score, label = ref["boxes"][i].numpy(), ref_scores[i], int(ref["labels"][i])
        box_error = np.abs(got["boxes"] - box).max(axis=1)
        score_error = np.abs(got["scores"] - score)
        fits = ((got["labels"] == label) & (score_error <= SCORE_ATOL) & ~used
                & (box_error <= BOX_ATOL + BOX_RTOL * np.abs(box).max()))
        assert fits.any(), f"PyTorch's detection {i} (label {label}, score {score:.6f}, box {box}) is not the graph's"
        j = int(np.flatnonzero(fits)[np.argmin(score_error[fits])])
        used[j] = True
        worst["boxes"] = max(worst["boxes"], float(box_error[j]))
        worst["scores"] = max(worst["scores"], float(score_error[j]))
    return worst


@pytest.mark.slow
def test_onnx_graph_gives_pytorchs_detections_at_any_image_size(tmp_path, tiny, one_thread, device):
    pytest.importorskip("onnxruntime")
    checkpoint = make_checkpoint(tmp_path, tiny)
    path = export_onnx(checkpoint, tmp_path / "model.onnx")  # the graph is traced on the CPU, whatever the device
    model, _ = load_model(checkpoint, device=device)
    session = one_thread_session(path)
    assert session.get_inputs()[0].shape == [3, "height", "width"]
    non_square = torch.rand(3, 48, 72, generator=torch.Generator().manual_seed(1))  # resized to 64 x 96 in the graph
    images = [load_image(image_path) for image_path in val_images(tmp_path)] + [non_square]
    counts = []
    for image in images:
        # cuDNN's TF32 convolutions would round to 10 bits, more than the scores' tolerance.
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            ref = {key: value.cpu() for key, value in model([image.to(device)])[0].items()}
        got = run_onnx(session, image)
        assert got["boxes"].dtype == np.float32 and got["labels"].dtype == np.int64
        assert np.all(np.diff(got["scores"]) <= 0), "scores must come in descending order"
        worst = match_detections(got, ref, score_floor=model.score_thresh, max_detections=model.detections_per_img)
        assert worst["boxes"] <= BOX_ATOL + BOX_RTOL * 96 and worst["scores"] <= SCORE_ATOL
        counts.append(len(ref["scores"]))
    assert min(counts) > 5, f"the test model must detect something to compare, got {counts}"
    onnx = pytest.importorskip("onnx")
    metadata = {prop.key: prop.value for prop in onnx.load(str(path)).metadata_props}
    assert json.loads(metadata["label_to_category_id"]) == [1, 3, 7, 12, 20]
    assert json.loads(metadata["category_names"])[0] == "circle"


@pytest.mark.slow
def test_fixed_size_export_matches_pytorch_and_refuses_other_sizes(tmp_path, tiny, one_thread):
    pytest.importorskip("onnxruntime")
    checkpoint = make_checkpoint(tmp_path, tiny)
    path = export_onnx(checkpoint, tmp_path / "fixed.onnx", image_size=64, opset=11, score_thresh=0.5)
    model, _ = load_model(checkpoint, device="cpu", score_thresh=0.5)
    session = one_thread_session(path)
    assert session.get_inputs()[0].shape == [3, 64, 64]
    image = load_image(val_images(tmp_path)[0])
    with torch.no_grad():
        ref = model([image])[0]
    got = run_onnx(session, image.numpy())
    match_detections(got, ref, score_floor=0.5, max_detections=model.detections_per_img)
    with pytest.raises(ValueError, match=r"exported for images of shape \[3, 64, 64\], got \[3, 48, 64\]"):
        run_onnx(session, image[:, :48])
    with pytest.raises(ValueError, match=r"expected a float \[3, H, W\] RGB image in \[0, 1\], got uint8"):
        run_onnx(session, (image * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"got float32 \[1, 3, 64, 64\]"):
        run_onnx(session, image[None])


def test_export_of_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path):
    pytest.importorskip("onnx")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes.pth cannot be read with weights_only=True") as raised:
        export_onnx(tmp_path / "notes.pth", tmp_path / "model.onnx")
    assert "\n" not in str(raised.value)
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other.pth is not a detfocal training checkpoint") as raised:
        export_onnx(tmp_path / "other.pth", tmp_path / "model.onnx")
    assert "\n" not in str(raised.value)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        export_onnx(tmp_path / "missing.pth", tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"image_size": 0}, r"image_size: expected None \(any size\) or an int in \[1, 4096\] \(pixels\), got 0"),
    ({"image_size": 100000}, r"image_size: .* in \[1, 4096\] \(pixels\), got 100000"),
    ({"image_size": 64.0}, "image_size: .* got 64.0"),
    ({"opset": 9}, r"opset: expected an int in \[11, 20\], got 9"),
    ({"score_thresh": 1.5}, r"score_thresh: expected a score in \[0, 1\], got 1.5"),
    ({"score_thresh": "0.5"}, r"score_thresh: expected a score in \[0, 1\], got '0.5'"),
])
def test_bad_export_arguments_are_named_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export_onnx(tmp_path / "missing.pth", tmp_path / "model.onnx", **kwargs)


def test_export_never_replaces_a_file_without_overwrite(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"mine")
    with pytest.raises(ValueError, match=r"model.onnx exists; pass overwrite=True \(--overwrite\)"):
        export_onnx(tmp_path / "missing.pth", tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").read_bytes() == b"mine"
    with pytest.raises(ValueError, match="is a folder"):
        export_onnx(tmp_path / "missing.pth", tmp_path)


def test_missing_onnx_or_onnxruntime_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx then raises ImportError
    with pytest.raises(ImportError, match=r"^ONNX export needs the onnx package: pip install onnx$"):
        export_onnx(tmp_path / "missing.pth", tmp_path / "model.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"^run_onnx needs the onnxruntime package: pip install onnxruntime$"):
        run_onnx(tmp_path / "model.onnx", np.zeros((3, 8, 8), np.float32))


def test_run_onnx_on_a_missing_or_broken_file_is_one_line(tmp_path):
    pytest.importorskip("onnxruntime")
    with pytest.raises(FileNotFoundError, match="ONNX model .*missing.onnx does not exist"):
        run_onnx(tmp_path / "missing.onnx", np.zeros((3, 8, 8), np.float32))
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="broken.onnx is not a loadable ONNX model") as raised:
        run_onnx(tmp_path / "broken.onnx", np.zeros((3, 8, 8), np.float32))
    assert "\n" not in str(raised.value)


@pytest.mark.slow
def test_export_command_writes_the_model_and_says_what_it_takes(tmp_path, tiny, capsys, one_thread):
    pytest.importorskip("onnx")
    from detfocal.cli import main as cli_main

    checkpoint = make_checkpoint(tmp_path, tiny)
    out = tmp_path / "model.onnx"
    assert cli_main(["export", str(checkpoint), "--format", "onnx", "--out", str(out), "--image-size", "64"]) == 0
    assert out.is_file() and "input image float32 [3, 64, 64] RGB in [0, 1]" in capsys.readouterr().out
    assert cli_main(["export", str(checkpoint), "--out", str(out)]) == 2  # never replaced without --overwrite
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_export_image_size_above_the_limit_is_one_line_before_reading_the_checkpoint(tmp_path, capsys):
    from detfocal.cli import main as cli_main

    code = cli_main(["export", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "model.onnx"),
                     "--image-size", "100000"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("error: image_size: expected None (any size) or an int in [1, 4096] (pixels), "
                                 "got 100000")
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("where", ["inside a file", "read-only"])
def test_export_to_an_unwritable_out_names_it_before_reading_the_checkpoint(tmp_path, capsys, where):
    from detfocal.cli import main as cli_main

    if where == "inside a file":
        (tmp_path / "notes.txt").write_text("mine")
        out, expected = tmp_path / "notes.txt" / "model.onnx", f"{tmp_path / 'notes.txt'} is a file, not a folder"
    else:  # sysfs refuses new entries even to root, for whom a chmod-ed folder stays writable
        out, expected = Path("/sys/detfocal-test/model.onnx"), "cannot be written: its folder /sys"
        if not Path("/sys").is_dir() or os.access("/sys", os.W_OK) and _can_create_in(Path("/sys")):
            pytest.skip("needs a read-only /sys")
    # The checkpoint does not exist: the message about --out shows that it came first.
    assert cli_main(["export", str(tmp_path / "missing.pth"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: --out {out} cannot be written") and expected in err
    assert ".tmp" not in err
    if where == "inside a file":
        assert (tmp_path / "notes.txt").read_text() == "mine"


def _can_create_in(folder: Path) -> bool:
    import tempfile

    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


def test_export_of_a_checkpoint_folder_says_it_is_a_folder(tmp_path, capsys):
    pytest.importorskip("onnx")
    from detfocal.cli import main as cli_main

    (tmp_path / "run").mkdir()
    assert cli_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "model.onnx")]) == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint {tmp_path / 'run'} is a folder, expected a .pth file"


def _identity_onnx_model(path: Path) -> Path:
    """A model with detfocal's input and output names whose outputs are its input: enough to open a session."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [3, "height", "width"])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("boxes", "scores", "labels")]
    nodes = [helper.make_node("Identity", ["image"], [name]) for name in ("boxes", "scores", "labels")]
    model = helper.make_model(helper.make_graph(nodes, "identity", [image], outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by older onnxruntime releases too
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("shape", [(3, 0, 0), (3, 0, 8), (3, 8, 0)])
def test_run_onnx_on_an_empty_image_names_the_image_and_its_shape(tmp_path, shape):
    pytest.importorskip("onnxruntime")
    path = _identity_onnx_model(tmp_path / "model.onnx")
    with pytest.raises(ValueError, match=rf"^image: expected an image with H, W >= 1, got an empty one of shape "
                                         rf"\[3, {shape[1]}, {shape[2]}\]$"):
        run_onnx(path, np.zeros(shape, np.float32))
    assert run_onnx(path, np.zeros((3, 2, 2), np.float32))["boxes"].shape == (3, 2, 2)  # the model itself runs


def test_run_onnx_on_a_folder_says_it_is_a_folder(tmp_path):
    pytest.importorskip("onnxruntime")
    with pytest.raises(ValueError, match=f"^ONNX model {tmp_path} is a folder, expected an .onnx file$"):
        run_onnx(tmp_path, np.zeros((3, 8, 8), np.float32))


def test_export_over_its_own_checkpoint_is_refused_even_with_overwrite(tmp_path):
    from detfocal.engine.export import export_onnx

    checkpoint = tmp_path / "ck.pth"
    torch.save({"iteration": 1}, checkpoint)
    with pytest.raises(ValueError, match="is the checkpoint being exported"):
        export_onnx(checkpoint, checkpoint, overwrite=True)
    assert torch.load(checkpoint, weights_only=True) == {"iteration": 1}
