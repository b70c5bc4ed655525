"""detfocal.engine.train and detfocal.engine.checkpoint: schedule, optimizer, precision, checkpoints, resume."""
from __future__ import annotations

import hashlib
import importlib.util
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from detfocal import engine
from detfocal.engine.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from detfocal.engine.optim import build_optimizer, build_scheduler, lr_factor
from detfocal.engine.precision import resolve_amp
from detfocal.engine.train import train_one_epoch

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    """Import tools/<name>.py as a module, for in-process runs (no interpreter start-up)."""
    spec = importlib.util.spec_from_file_location(f"detfocal_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """In-process runs of tiny models: one thread is as fast, and does not fight other processes
    for the cores (libgomp's spinning threads slow down many-fold when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_overrides(shapes_root: Path) -> list[str]:
    """A run of a few seconds: 64 px shapes, a thin FPN, one head conv, fp32, no workers."""
    return [f"data.shapes={{root: {shapes_root}, num_train: 8, num_val: 4, image_size: 64, min_object_size: 6, max_objects: 3}}",
            "model.min_size=64", "model.max_size=64", "model.fpn_channels=32", "model.head.num_convs=1",
            "model.head.norm=none", "train.batch_size=4", "train.epochs=1", "train.warmup_iters=2", "train.amp=off",
            "train.log_interval=1", "data.workers=0", "eval.batch_size=4", "eval.interval=1"]


# ---------------------------------------------------------------------------------------------
# schedule and optimizer


def test_warmup_is_linear_from_warmup_factor_to_one():
    kwargs = dict(warmup_iters=10, warmup_factor=0.001, schedule="step", steps=(100,))
    assert lr_factor(0, **kwargs) == pytest.approx(0.001)
    assert lr_factor(5, **kwargs) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(10, **kwargs) == 1.0
    assert lr_factor(99, **kwargs) == 1.0


def test_step_schedule_multiplies_by_gamma_at_each_step():
    kwargs = dict(warmup_iters=0, warmup_factor=1.0, schedule="step", steps=(60000, 80000), gamma=0.1)
    assert [lr_factor(i, **kwargs) for i in (59999, 60000, 79999, 80000, 89999)] == \
        pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])


def test_cosine_schedule_goes_from_one_to_min_factor():
    kwargs = dict(warmup_iters=0, warmup_factor=1.0, schedule="cosine", total_iters=100, min_lr_factor=0.1)
    assert lr_factor(0, **kwargs) == 1.0
    assert lr_factor(50, **kwargs) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, **kwargs) == pytest.approx(0.1)
    assert lr_factor(25, **kwargs) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_bad_schedule_raises_at_build_time():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="cosine needs the total number of iterations"):
        build_scheduler(optimizer, warmup_iters=0, warmup_factor=1.0, schedule="cosine")
    with pytest.raises(ValueError, match="expected 'step' or 'cosine'"):
        build_scheduler(optimizer, warmup_iters=0, warmup_factor=1.0, schedule="poly")


def test_scheduler_follows_lr_factor_per_iteration_and_its_state_is_plain():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    kwargs = dict(warmup_iters=3, warmup_factor=0.1, schedule="step", steps=(5,), gamma=0.5)
    scheduler = build_scheduler(optimizer, **kwargs)
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.5 * lr_factor(i, **kwargs) for i in range(7)])
    assert scheduler.last_epoch == 7
    state = scheduler.state_dict()
    assert state["lr_lambdas"] == [None]  # a closure is not pickled into the checkpoint


def test_optimizer_skips_weight_decay_on_biases_and_norms():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    for name, expected in (("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)):
        optimizer = build_optimizer(model, name=name, lr=0.1, momentum=0.8, weight_decay=0.01)
        assert isinstance(optimizer, expected)
        decayed, plain = optimizer.param_groups
        assert {p.ndim for p in decayed["params"]} == {2, 4} and decayed["weight_decay"] == 0.01
        assert {p.ndim for p in plain["params"]} == {1} and plain["weight_decay"] == 0.0
        assert len(decayed["params"]) + len(plain["params"]) == 5  # the frozen bias is left out
    with pytest.raises(ValueError, match="train.optimizer"):
        build_optimizer(model, name="lamb", lr=0.1)


# ---------------------------------------------------------------------------------------------
# precision


def test_amp_off_and_forced_choices():
    cpu = torch.device("cpu")
    assert resolve_amp("off", cpu)[:2] == (None, False)
    dtype, channels_last, note = resolve_amp("fp16", cpu)
    assert dtype is torch.float16 and "GradScaler" in note
    assert resolve_amp("bf16", cpu)[:2] == (torch.bfloat16, True)
    with pytest.raises(ValueError, match="train.amp"):
        resolve_amp("fp8", cpu)


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_on_cpu_uses_bf16_only_with_native_support(monkeypatch, native):
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: native)
    dtype, channels_last, note = resolve_amp("auto", torch.device("cpu"))
    assert (dtype, channels_last) == ((torch.bfloat16, True) if native else (None, False))
    assert note.startswith("precision: ") and "\n" not in note


def test_amp_auto_on_cuda_is_fp16_with_scaler():
    dtype, channels_last, note = resolve_amp("auto", torch.device("cuda", 0))
    assert dtype is torch.float16 and not channels_last and "GradScaler" in note


def test_cpu_bf16_detection_agrees_with_cpuinfo():
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert engine.cpu_supports_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


# ---------------------------------------------------------------------------------------------
# one epoch


class ConstantLossModel(nn.Module):
    """Returns ``{"classification": w * value, "bbox_regression": w}``, whatever the batch."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.value = value

    def forward(self, images, targets):
        return {"classification": self.weight * self.value, "bbox_regression": self.weight.abs()}


def _loader(num_batches: int):
    return [([torch.zeros(3, 8, 8)], [{"boxes": torch.zeros(0, 4), "image_id": i}]) for i in range(num_batches)]


def test_train_one_epoch_logs_first_and_every_interval_and_honours_max_iters():
    model = ConstantLossModel(2.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = build_scheduler(optimizer, warmup_iters=0, warmup_factor=1.0, schedule="step")
    records = []
    stats = train_one_epoch(model, optimizer, scheduler, _loader(10), torch.device("cpu"), 0, log_interval=3,
                            metrics_writer=records.append, is_main=False, max_iters=7)
    assert [r["step"] for r in records] == [1, 3, 6]
    assert stats["iters"] == 7 and stats["global_step"] == 7
    first = records[0]
    assert first["type"] == "train" and first["loss"] == pytest.approx(3.0)
    assert first["classification"] == pytest.approx(2.0) and first["bbox_regression"] == pytest.approx(1.0)
    assert first["lr"] == 0.01 and first["images_per_s"] > 0


def test_non_finite_loss_raises_one_line_before_the_optimizer_steps():
    model = ConstantLossModel(float("nan"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = build_scheduler(optimizer, warmup_iters=0, warmup_factor=1.0, schedule="step")
    with pytest.raises(FloatingPointError) as info:
        train_one_epoch(model, optimizer, scheduler, _loader(3), torch.device("cpu"), 4, is_main=False)
    message = str(info.value)
    assert "\n" not in message and "epoch 4, step 1" in message and "classification=nan" in message
    assert model.weight.item() == 1.0 and scheduler.last_epoch == 0


def test_grad_clip_bounds_the_update():
    model = ConstantLossModel(1000.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = build_scheduler(optimizer, warmup_iters=0, warmup_factor=1.0, schedule="step")
    train_one_epoch(model, optimizer, scheduler, _loader(1), torch.device("cpu"), 0, grad_clip=0.5, is_main=False)
    assert model.weight.item() == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trips_with_weights_only(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "best_ap": 0.25,
             "rng": capture_rng_state(), "config": {"train": {"lr": 0.1, "steps": [1, 2]}, "imports": []}}
    save_checkpoint(tmp_path / "sub" / "last.pth", state)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["last.pth"]  # no temp file left
    loaded = torch.load(tmp_path / "sub" / "last.pth", weights_only=True)
    assert loaded["epoch"] == 3 and loaded["config"] == state["config"]
    assert torch.equal(loaded["model"]["weight"], model.weight)
    assert load_checkpoint(tmp_path / "sub" / "last.pth")["best_ap"] == 0.25


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"epoch": 1})
    before = path.read_bytes()

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read with weights_only=True"):
        load_checkpoint(tmp_path / "bad.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pth")


def test_rng_state_restores_torch_python_and_numpy(tmp_path):
    save_checkpoint(tmp_path / "rng.pth", {"rng": capture_rng_state()})
    expected = (torch.rand(3), random.random(), np.random.rand(2))
    restore_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1] and np.array_equal(expected[2], again[2])


# ---------------------------------------------------------------------------------------------
# whole runs, in-process


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_two_epochs_equal_one_epoch_plus_resume(tmp_path, one_thread):
    train = load_tool("train")
    config = str(ROOT / "configs" / "shapes_retinanet_r18.yaml")
    # A step schedule: a cosine one would depend on max_iters, which the interrupted run changes.
    common = tiny_overrides(tmp_path / "shapes") + ["train.epochs=2", "train.deterministic=true", "eval.interval=5",
                                                    "train.schedule={type: step, steps: [3]}",
                                                    "data.augment={hflip: 0.5, scale_jitter: [0.8, 1.2]}"]
    assert train.main([config, "--output-dir", str(tmp_path / "straight"), "--set", *common]) == 0
    # The same run stopped after one epoch (as if killed), then resumed from its last.pth.
    assert train.main([config, "--output-dir", str(tmp_path / "resumed"), "--set", *common, "train.max_iters=2"]) == 0
    first_half = load_checkpoint(tmp_path / "resumed" / "last.pth")
    assert (first_half["epoch"], first_half["global_step"]) == (1, 2)
    assert train.main([config, "--output-dir", str(tmp_path / "resumed"), "--resume", "--set", *common]) == 0

    straight = load_checkpoint(tmp_path / "straight" / "last.pth")
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pth")
    assert straight["global_step"] == resumed["global_step"] == 4
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert straight["scheduler"] == resumed["scheduler"]


@pytest.mark.slow
def test_non_finite_loss_exits_1_with_one_line_and_keeps_last_checkpoint(tmp_path, capsys, monkeypatch, one_thread):
    from detfocal.modeling.retinanet import FocalRetinaNet

    train = load_tool("train")
    config = str(ROOT / "configs" / "shapes_retinanet_r18.yaml")
    out = tmp_path / "run"
    common = tiny_overrides(tmp_path / "shapes") + ["eval.interval=5", "train.epochs=1"]
    assert train.main([config, "--output-dir", str(out), "--set", *common]) == 0
    good = _sha256(out / "last.pth")
    capsys.readouterr()

    # The detector's loss turns infinite, as after a divergence, in the resumed second epoch.
    compute_loss = FocalRetinaNet.compute_loss

    def diverged(self, *args):
        losses = compute_loss(self, *args)
        return {**losses, "classification": losses["classification"] * float("inf")}

    monkeypatch.setattr(FocalRetinaNet, "compute_loss", diverged)
    code = train.main([config, "--output-dir", str(out), "--resume", "--set", *common, "train.epochs=2"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1
    assert len(errors) == 1 and "non-finite loss at epoch 1, step 3" in errors[0] and "classification=inf" in errors[0]
    assert _sha256(out / "last.pth") == good


@pytest.mark.slow
def test_bf16_autocast_with_channels_last_trains_and_evaluates(tmp_path, capsys, one_thread):
    # The path amp: auto takes on CPUs with AVX-512-BF16/AMX, forced here on any CPU.
    train = load_tool("train")
    config = str(ROOT / "configs" / "shapes_retinanet_r18.yaml")
    out = tmp_path / "run"
    overrides = tiny_overrides(tmp_path / "shapes") + ["train.amp=bf16", "train.max_iters=2"]
    assert train.main([config, "--output-dir", str(out), "--set", *overrides]) == 0
    assert "precision: bf16 autocast + channels_last (set by train.amp)" in capsys.readouterr().out
    steps = [r for r in engine.read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    state = load_checkpoint(out / "last.pth")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
