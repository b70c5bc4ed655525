"""detfocal.engine: schedule, optimizer, precision, the train step, checkpoints, whole runs and resume."""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import detfocal
from detfocal.cli import main as cli_main
from detfocal.engine import precision
from detfocal.engine.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from detfocal.utils.io import read_jsonl as read_metrics
from detfocal.engine.optim import build_ema, build_lr_schedule, build_optimizer, lr_factor, set_lr
from detfocal.engine.precision import resolve_amp
from detfocal.engine import loop as loop_module
from detfocal.engine.run_dir import RunFolder, choose_resume_checkpoint
from detfocal.engine.step import train_step
from conftest import NO_CUDA
from detfocal.evaluation.coco import STAT_NAMES

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "shapes_retinanet_r18.yaml")


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
    with pytest.raises(ValueError, match="cosine needs the total number of iterations"):
        build_lr_schedule(warmup_iters=0, warmup_factor=1.0, schedule="cosine")
    with pytest.raises(ValueError, match="expected 'step' or 'cosine'"):
        build_lr_schedule(warmup_iters=0, warmup_factor=1.0, schedule="poly")


def test_lr_schedule_is_a_pure_function_of_the_iteration():
    kwargs = dict(warmup_iters=3, warmup_factor=0.1, schedule="step", steps=(5,), gamma=0.5)
    schedule = build_lr_schedule(**kwargs)
    assert [schedule(i) for i in range(7)] == [lr_factor(i, **kwargs) for i in range(7)]
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    set_lr(optimizer, 0.5 * schedule(4))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * lr_factor(4, **kwargs))


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
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: native)
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
    assert precision.cpu_supports_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_cpu_description_names_the_model_and_vector_extensions():
    text = precision.cpu_description()
    assert "\n" not in text and ("AVX" in text or "no AVX2" in text)


# ---------------------------------------------------------------------------------------------
# one step


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` (inf makes it overflow)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ConstantLossModel(nn.Module):
    """Returns ``{"classification": w * value, "bbox_regression": |w|}``, whatever the batch."""

    def __init__(self, value: float, grad_scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.value = value
        self.grad_scale = grad_scale

    def forward(self, images, targets):
        weight = _ScaleGradient.apply(self.weight, self.grad_scale)
        return {"classification": weight * self.value, "bbox_regression": self.weight.abs()}


def _batch(device="cpu"):
    return [torch.zeros(3, 8, 8, device=device)], [{"boxes": torch.zeros(0, 4, device=device), "image_id": 0}]


def _step(model, optimizer, device="cpu", **kwargs):
    images, targets = _batch(device)
    return train_step(model, images, targets, optimizer, **{"amp_dtype": None, "scaler": None, "grad_clip": None,
                                                            **kwargs})


def test_train_step_logs_losses_and_grad_norm_and_steps(device):
    model = ConstantLossModel(2.0).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    logged = _step(model, optimizer, device)
    assert logged["loss"] == pytest.approx(3.0) and logged["classification"] == pytest.approx(2.0)
    assert logged["grad_norm"] == pytest.approx(3.0) and logged["skipped"] == 0.0 and logged["stop"] == 0.0
    assert model.weight.item() == pytest.approx(1.0 - 0.01 * 3.0)


def test_non_finite_loss_raises_one_line_before_the_optimizer_steps():
    model = ConstantLossModel(float("nan"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(FloatingPointError) as info:
        _step(model, optimizer, iteration=4)
    message = str(info.value)
    assert "\n" not in message and "step 5" in message and "classification=nan" in message
    assert model.weight.item() == 1.0


def test_non_finite_gradient_in_fp32_names_the_parameter_and_does_not_step():
    model = ConstantLossModel(1.0, grad_scale=float("inf"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient at step 3 in parameter weight"):
        _step(model, optimizer, iteration=2)
    assert model.weight.item() == 1.0


def test_fp16_scaler_skips_an_overflowing_step_and_counts_it(device):
    model = ConstantLossModel(1.0, grad_scale=float("inf")).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 16)
    logged = _step(model, optimizer, device, scaler=scaler)
    assert logged["skipped"] == 1.0 and model.weight.item() == 1.0
    assert scaler.get_scale() == 2.0 ** 15  # the scaler backed off


def test_grad_clip_bounds_the_update():
    model = ConstantLossModel(1000.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    logged = _step(model, optimizer, grad_clip=0.5)
    assert logged["grad_norm"] == pytest.approx(1001.0)  # the norm before clipping is logged
    assert model.weight.item() == pytest.approx(0.5)


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _tiny_retinanet_step_parts(device, amp):
    """A tiny RetinaNet (R18, FPN 32, GN head of one conv, 64 px) with the optimizer, GradScaler and batch
    of a training run (detfocal's fused AdamW, grad_clip 10), a crowd box included, all on ``device``."""
    from detfocal.modeling.retinanet import build_retinanet

    torch.manual_seed(0)
    model = build_retinanet(3, "resnet18", fpn_channels=32, min_size=64, max_size=64,
                            head={"type": "focal", "num_convs": 1, "norm": "gn"}).to(device).train()
    optimizer = build_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device) if AMP_DTYPES[amp] is torch.float16 else None
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=generator).to(device) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 20.0, 60.0, 50.0], [2.0, 40.0, 24.0, 62.0]]),
                "labels": torch.tensor([0, 2, 1]), "iscrowd": torch.tensor([0, 0, 1])},
               {"boxes": torch.tensor([[10.0, 10.0, 50.0, 44.0]]), "labels": torch.tensor([1]),
                "iscrowd": torch.tensor([0])}]
    targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
    kwargs = {"amp_dtype": AMP_DTYPES[amp], "scaler": scaler, "grad_clip": 10.0}
    return model, optimizer, images, targets, kwargs


@pytest.mark.parametrize("amp", list(AMP_DTYPES))
def test_train_step_of_a_tiny_retinanet_under_each_amp_gives_fp32s_losses_and_steps(amp, device):
    import copy

    model, optimizer, images, targets, kwargs = _tiny_retinanet_step_parts(device, amp)
    reference = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    logged = train_step(model, images, targets, optimizer, **kwargs)
    expected = train_step(reference, images, targets, build_optimizer(reference, name="adamw", lr=1e-3),
                          amp_dtype=None, scaler=None, grad_clip=10.0)
    # The 16-bit forward rounds activations to 8 (bf16) or 11 (fp16) bits; the losses are computed in fp32.
    rtol = {"off": 1e-5, "bf16": 3e-2, "fp16": 5e-3}[amp]
    for name in ("classification", "bbox_regression", "loss"):
        assert logged[name] == pytest.approx(expected[name], rel=rtol), name
    assert logged["grad_norm"] == pytest.approx(expected["grad_norm"], rel=10 * rtol)
    assert logged["skipped"] == 0.0 and all(math.isfinite(logged[name]) for name in logged)
    # The optimizer stepped every parameter it had a gradient for (GroupNorm over the 1 x 1 P6/P7 maps
    # of 64 px images gives their biases an exactly zero one in 16 bits).
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()) if p.grad is not None and p.grad.any())


def _sync_debug_mode(mode):
    """Set CUDA's sync debug mode; returns the previous one."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    return previous


@NO_CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("amp", list(AMP_DTYPES))
def test_cuda_training_steps_make_no_host_sync_but_the_documented_one(amp):
    """train_step under torch.cuda.set_sync_debug_mode: the step's all-reduce .tolist() (documented_sync)
    is the only sync of detfocal's code. torchvision's own are excused, each where it is:
    GeneralizedRCNNTransform (image mean/std and box ratios built from Python numbers) and RetinaNet's
    degenerate-box check, from the transform's forward to the backbone's; and
    RetinaNetRegressionHead.compute_loss (torch.where per image, BoxCoder's weights). First under
    "warn", to list every other sync at once; then under "error", as asked of a training step."""
    import warnings

    from torchvision.models.detection.retinanet import RetinaNetRegressionHead

    from detfocal.modeling.retinanet import infer_norm_layer

    model, optimizer, images, targets, kwargs = _tiny_retinanet_step_parts("cuda", amp)
    outer = []

    def excuse(module, inputs):  # a forward pre-hook must return None, or its value replaces the inputs
        outer.append(_sync_debug_mode(0))

    def resume(module, inputs):
        _sync_debug_mode(outer.pop())

    model.transform.register_forward_pre_hook(excuse)
    model.backbone.register_forward_pre_hook(resume)

    class SyncExcusedRegressionHead(RetinaNetRegressionHead):
        def compute_loss(self, *args):
            previous = _sync_debug_mode(0)
            try:
                return super().compute_loss(*args)
            finally:
                _sync_debug_mode(previous)

    stock = model.head.regression_head
    excused = SyncExcusedRegressionHead(stock.conv[0][0].in_channels, stock.bbox_reg.out_channels // 4,
                                        norm_layer=infer_norm_layer(stock.conv[0])).cuda()
    excused.load_state_dict(stock.state_dict())
    model.head.regression_head = excused  # RetinaNetHead's public slot
    optimizer = build_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.05)  # over the new head's weights
    for _ in range(2):  # warm-up: the anchor cache, cuDNN's choices, the optimizer state, the GradScaler
        train_step(model, images, targets, optimizer, **kwargs)
    torch.cuda.synchronize()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _sync_debug_mode("warn")
            for _ in range(3):
                train_step(model, images, targets, optimizer, **kwargs)
        syncs = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught
                        if "synchronizing" in str(w.message)})
        assert not syncs, f"host syncs besides the documented one: {syncs}"
        _sync_debug_mode("error")
        for _ in range(2):
            logged = train_step(model, images, targets, optimizer, **kwargs)
    finally:
        _sync_debug_mode(0)
    assert all(math.isfinite(logged[name]) for name in ("loss", "grad_norm"))


# ---------------------------------------------------------------------------------------------
# the run folder


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"type": "epoch", "epoch": 3, "AP": 0.567}\n')
    (tmp_path / "last.pth").write_bytes(b"weights")
    (tmp_path / "mine.txt").write_text("the user's own file")
    with pytest.raises(ValueError, match=r"holds a run \(epoch 4, best AP 0.57\); use --resume"):
        RunFolder(tmp_path).__enter__()
    assert (tmp_path / "last.pth").read_bytes() == b"weights"
    with RunFolder(tmp_path, overwrite=True) as folder:
        assert (tmp_path / "last.pth").read_bytes() == b"weights"  # nothing moves before the run can start
        folder.start("model: {}\n")
        assert not (tmp_path / "last.pth").exists() and (tmp_path / ".previous-run" / "last.pth").exists()
        folder.checkpoint_written()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".detfocal.lock", "config.yaml", "mine.txt", "run.json"]


def test_overwrite_puts_the_old_run_back_when_the_new_one_fails_before_its_first_checkpoint(tmp_path):
    (tmp_path / "last.pth").write_bytes(b"weights")
    with pytest.raises(RuntimeError, match="boom"):
        with RunFolder(tmp_path, overwrite=True) as folder:
            folder.start("model: {}\n")
            raise RuntimeError("boom")
    assert (tmp_path / "last.pth").read_bytes() == b"weights" and not (tmp_path / ".previous-run").exists()


def test_only_our_own_checkpoint_temporaries_are_removed_at_start(tmp_path):
    (tmp_path / ".last.pth.abc_1234.tmp").write_bytes(b"half a checkpoint")
    for name in (".notes.tmp", ".last.pth.tmp", ".hidden", ".mine.pth.abc_1234.tmp"):
        (tmp_path / name).write_text("the user's own")
    with RunFolder(tmp_path):
        pass
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".detfocal.lock", ".hidden", ".last.pth.tmp", ".mine.pth.abc_1234.tmp", ".notes.tmp"]


def test_a_second_training_into_a_locked_folder_is_refused_at_once(tmp_path):
    import subprocess
    import sys

    # The lock is held by another process (flock locks are per open file, so a thread would not do).
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from detfocal.engine.run_dir import RunFolder; "
                               f"f = RunFolder({str(tmp_path)!r}).__enter__(); print('locked', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=r"is in use by another training \(pid \d+"):
            RunFolder(tmp_path).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with RunFolder(tmp_path):  # a killed holder leaves no stale lock
        pass


def test_unwritable_output_dir_is_a_one_line_error_before_any_work(tmp_path, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)  # root ignores chmod, so simulate it
    with pytest.raises(ValueError, match=r"--output-dir .* cannot be written: Permission denied"):
        RunFolder(tmp_path / "run").__enter__()


def test_output_dir_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, expected a folder"):
        RunFolder(tmp_path / "file").__enter__()


def test_resume_chooses_the_checkpoint_with_more_iterations_not_the_newer_file(tmp_path):
    save_checkpoint(tmp_path / "interrupted.pth", {"iteration": 7})
    save_checkpoint(tmp_path / "last.pth", {"iteration": 4})
    os.utime(tmp_path / "last.pth", (2e9, 2e9))  # touched: newer on disk, older in training
    assert choose_resume_checkpoint(tmp_path) == tmp_path / "interrupted.pth"
    save_checkpoint(tmp_path / "last.pth", {"iteration": 7})
    assert choose_resume_checkpoint(tmp_path) == tmp_path / "last.pth"  # a tie goes to last.pth


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


def test_atomic_writes_respect_the_umask_and_keep_an_existing_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "new.pth", {"epoch": 1})
        assert path.stat().st_mode & 0o777 == 0o644
        os.chmod(path, 0o640)
        save_checkpoint(path, {"epoch": 2})
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------------------------
# whole runs, in-process


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_weights(a: Path, b: Path) -> None:
    first, second = load_checkpoint(a), load_checkpoint(b)
    assert first["iteration"] == second["iteration"]
    for key, value in first["model"].items():
        assert torch.equal(value, second["model"][key]), key


def _straight_and_resumed(tmp_path: Path, common: list[str]) -> None:
    """Train ``common`` for 2 epochs into tmp_path/straight; and into tmp_path/resumed, stopped after
    2 iterations (as if killed) and then resumed from its last.pth."""
    assert cli_main(["train", DEMO, "--output-dir", str(tmp_path / "straight"), "--set", *common]) == 0
    assert cli_main(["train", DEMO, "--output-dir", str(tmp_path / "resumed"), "--set", *common,
                     "train.max_iters=2"]) == 0
    assert load_checkpoint(tmp_path / "resumed" / "last.pth")["iteration"] == 2
    assert cli_main(["train", DEMO, "--output-dir", str(tmp_path / "resumed"), "--resume", "--set", *common]) == 0


@pytest.mark.slow
def test_train_is_a_library_call_returning_a_summary(tmp_path, tiny, one_thread, caplog, monkeypatch):
    from detfocal.engine import workers

    caplog.set_level(logging.INFO, logger="detfocal")
    monkeypatch.setattr(workers, "available_cores", lambda local_world_size=1: 1)
    summary = detfocal.train(DEMO, tmp_path / "run", overrides=[*tiny, "train.max_iters=2", "data.workers=auto"])
    assert summary["iterations"] == 2 and summary["stopped"] == "max_iters" and 0.0 <= summary["AP"] <= 1.0
    # One core: "auto" measures, and keeps loading in the training process.
    assert summary["data_workers"] == 0
    assert "data.workers: auto chose 0 (loading a batch takes" in caplog.text
    assert not any(record.levelno >= logging.WARNING for record in caplog.records)
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "last.pth").is_file()


@pytest.mark.slow
def test_two_epochs_equal_one_epoch_plus_resume(tmp_path, tiny, one_thread, run_device):
    # A step schedule: a cosine one would depend on max_iters, which the interrupted run changes.
    common = tiny + ["train.epochs=2", "train.deterministic=true", "eval.interval=5",
                     "train.schedule={type: step, steps: [3]}", "data.augment={hflip: 0.5, scale_jitter: [0.8, 1.2]}"]
    _straight_and_resumed(tmp_path, common)
    _same_weights(tmp_path / "straight" / "last.pth", tmp_path / "resumed" / "last.pth")


@pytest.mark.slow
def test_ctrl_c_mid_epoch_resumes_at_that_iteration_with_identical_weights(tmp_path, tiny, one_thread, monkeypatch,
                                                                            capsys):
    # 8 images at batch 2: 4 iterations per epoch; Ctrl-C arrives during step 2 of epoch 1.
    common = tiny + ["train.epochs=2", "train.batch_size=2", "train.deterministic=true", "eval.interval=5",
                     "data.augment={hflip: 0.5, scale_jitter: [0.8, 1.2]}"]
    assert cli_main(["train", DEMO, "--output-dir", str(tmp_path / "straight"), "--set", *common]) == 0
    step = loop_module.train_step

    def interrupted_step(*args, **kwargs):
        if kwargs["iteration"] == 5:
            signal.raise_signal(signal.SIGINT)
        return step(*args, **kwargs)

    monkeypatch.setattr(loop_module, "train_step", interrupted_step)
    out = tmp_path / "resumed"
    assert cli_main(["train", DEMO, "--output-dir", str(out), "--set", *common]) == 130
    assert "interrupted: saved" in capsys.readouterr().err
    assert load_checkpoint(out / "interrupted.pth")["iteration"] == 6
    monkeypatch.setattr(loop_module, "train_step", step)
    assert cli_main(["train", DEMO, "--output-dir", str(out), "--resume", "--set", *common]) == 0
    assert "resumed from" in capsys.readouterr().out
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
    assert steps == list(range(1, 9))  # no iteration twice, none skipped
    assert not (out / "interrupted.pth").exists()
    _same_weights(tmp_path / "straight" / "last.pth", out / "last.pth")


@pytest.mark.slow
def test_rerunning_into_a_finished_run_is_refused_and_overwrite_replaces_it(tmp_path, tiny, one_thread, capsys):
    out = tmp_path / "run"
    argv = ["train", DEMO, "--output-dir", str(out), "--set", *tiny, "train.max_iters=1"]
    assert cli_main(argv) == 0
    before = _sha256(out / "last.pth")
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{out} holds a run (epoch" in err and "--overwrite" in err
    assert _sha256(out / "last.pth") == before
    assert cli_main(argv + ["--overwrite"]) == 0
    assert len([r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]) == 1  # not appended


@pytest.mark.slow
def test_resume_with_another_model_is_one_line_naming_the_difference(tmp_path, tiny, one_thread, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", DEMO, "--output-dir", str(out), "--set", *tiny, "train.max_iters=1"]) == 0
    capsys.readouterr()
    code = cli_main(["train", DEMO, "--output-dir", str(out), "--resume", "--set", *tiny, "model.head.num_convs=2",
                     "model.backbone=resnet34"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "checkpoint: 5 classes, resnet18, FPN 32, focal head with 1 convs" in err
    assert "config: 5 classes, resnet34, FPN 32, focal head with 2 convs" in err


@pytest.mark.slow
def test_non_finite_loss_exits_1_with_one_line_and_keeps_last_checkpoint(tmp_path, tiny, capsys, monkeypatch,
                                                                         one_thread):
    from detfocal.modeling.retinanet import FocalRetinaNet

    out = tmp_path / "run"
    common = tiny + ["eval.interval=5", "train.epochs=1"]
    assert cli_main(["train", DEMO, "--output-dir", str(out), "--set", *common]) == 0
    good = _sha256(out / "last.pth")
    capsys.readouterr()

    # The detector's loss turns infinite, as after a divergence, in the resumed second epoch.
    compute_loss = FocalRetinaNet.compute_loss

    def diverged(self, *args):
        losses = compute_loss(self, *args)
        return {**losses, "classification": losses["classification"] * float("inf")}

    monkeypatch.setattr(FocalRetinaNet, "compute_loss", diverged)
    code = cli_main(["train", DEMO, "--output-dir", str(out), "--resume", "--set", *common, "train.epochs=2"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1
    assert len(errors) == 1 and "non-finite loss at step 3" in errors[0] and "classification=inf" in errors[0]
    assert _sha256(out / "last.pth") == good


@pytest.mark.slow
def test_bf16_autocast_trains_and_evaluates_with_channels_last_on_cpu(tmp_path, tiny, capsys, one_thread, run_device):
    # The path amp: auto takes on CPUs with AVX-512-BF16/AMX, forced here on any CPU; on CUDA without channels_last.
    out = tmp_path / "run"
    assert cli_main(["train", DEMO, "--output-dir", str(out), "--set", *tiny, "train.amp=bf16",
                     "train.max_iters=2"]) == 0
    layout = " + channels_last" if run_device == "cpu" else ""
    assert f"precision: bf16 autocast{layout} (set by train.amp)" in capsys.readouterr().out
    steps = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)


@pytest.mark.slow
def test_fp16_with_grad_scaler_trains_skipping_at_most_the_first_steps(tmp_path, tiny, capsys, one_thread, run_device):
    # The CUDA default (fp16 autocast + GradScaler), on the CPU too: 32 steps at batch 2. The scaler
    # starts at 2^16 and halves on each overflow until scale x gradient fits fp16; in fp32 this run's
    # gradient norm peaks near 130, so a handful of early skips is the scaler working as designed.
    out = tmp_path / "run"
    assert cli_main(["train", DEMO, "--output-dir", str(out), "--set", *tiny, "train.amp=fp16", "train.batch_size=2",
                     "train.epochs=8", "train.lr=0.004", "train.warmup_iters=8", "eval.interval=100"]) == 0
    assert "precision: fp16 autocast + GradScaler" in capsys.readouterr().out
    steps = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
    assert len(steps) == 32 and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["skipped_steps"] <= 8
    assert steps[15]["skipped_steps"] == steps[-1]["skipped_steps"]  # none in the second half
    first, last = np.mean([r["loss"] for r in steps[:4]]), np.mean([r["loss"] for r in steps[-4:]])
    assert last < first


@pytest.mark.slow
def test_logs_are_plain_lines_outside_a_terminal(tmp_path, tiny, capsys, one_thread):
    out = tmp_path / "run"
    assert cli_main(["train", DEMO, "--output-dir", str(out), "--set", *tiny, "train.max_iters=2"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out
    assert "epoch 0 step 1/2: loss" in captured.out and "epoch 0 step 2/2: loss" in captured.out


# ---------------------------------------------------------------------------------------------
# weight EMA, early stopping, TensorBoard, fine-tuning


def test_ema_follows_the_ramped_decay_formula_and_copies_integer_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = build_ema(model, decay=0.9, warmup_iters=2)
    expected = model[0].weight.detach().clone().double()
    for update in range(1, 4):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model[1].num_batches_tracked.add_(1)
        ema.update_parameters(model)
        if update > 1:  # the first call copies; later calls average with the ramped decay
            decay = 0.9 * (1 - math.exp(-(update - 1) / 2))
            expected = decay * expected + (1 - decay) * model[0].weight.detach().double()
        else:
            expected = model[0].weight.detach().clone().double()
        assert torch.allclose(ema.module[0].weight.double(), expected, atol=1e-6)
    assert ema.module[1].num_batches_tracked.item() == 3


@pytest.mark.slow
def test_ema_weights_are_evaluated_saved_and_resumed_exactly(tmp_path, tiny, one_thread):
    common = tiny + ["train.epochs=2", "train.deterministic=true", "eval.interval=5",
                     "train.ema={decay: 0.9, warmup_iters: 2}", "train.schedule={type: step, steps: [3]}"]
    _straight_and_resumed(tmp_path, common)
    straight, resumed = (load_checkpoint(tmp_path / name / "last.pth") for name in ("straight", "resumed"))
    assert straight["ema_updates"] == resumed["ema_updates"] == 4
    for key, value in straight["ema"].items():
        assert torch.equal(value, resumed["ema"][key]), key
    assert any(not torch.equal(value, straight["model"][key]) for key, value in straight["ema"].items())
    model, _ = detfocal.load_model(tmp_path / "straight" / "last.pth")  # inference takes the EMA weights
    assert all(torch.equal(value, straight["ema"][key]) for key, value in model.state_dict().items())


@pytest.mark.slow
def test_patience_stops_a_run_that_no_longer_improves(tmp_path, tiny, caplog, one_thread):
    caplog.set_level(logging.INFO, logger="detfocal")
    # A learning rate so small that the weights (and so the AP) cannot change between evaluations.
    summary = detfocal.train(DEMO, tmp_path / "run", overrides=[*tiny, "train.epochs=6", "train.lr=1e-12",
                                                                 "train.patience=2"])
    assert summary["stopped"] == "early stopping: no better val AP in 2 evaluations"
    assert summary["iterations"] == 3 * 2  # best at the first evaluation, then two without a better one
    assert "done (early stopping" in caplog.text


@pytest.mark.slow
def test_tensorboard_events_hold_losses_stats_curves_and_images(tmp_path, tiny, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    detfocal.train(DEMO, tmp_path / "run", overrides=[*tiny, "train.max_iters=2"])
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/classification", "train/bbox_regression", "train/lr", "train/images_per_s",
            "train/grad_norm"} <= scalars
    assert {f"val/{name}" for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
                                       "ARm", "ARl")} <= scalars
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2]
    images = events.Tags()["images"]
    assert "val/pr_curves" in images and sum(tag.startswith("val/image_") for tag in images) == 4


def test_fine_tuning_loads_a_torchvision_retinanet_and_reinitialises_the_classifier(tmp_path):
    import torchvision

    from detfocal.engine.checkpoint import load_detector_weights
    from detfocal.modeling import build_retinanet

    torch.manual_seed(0)
    coco_model = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None,
                                                                     num_classes=91)
    torch.save(coco_model.state_dict(), tmp_path / "retinanet_coco.pth")
    model = build_retinanet(num_classes=3, backbone="resnet50", min_size=64, max_size=64)
    fresh_bias = model.head.classification_head.cls_logits.bias.detach().clone()
    note = load_detector_weights(model, tmp_path / "retinanet_coco.pth")
    assert note.startswith("model.weights: loaded") and "\n" not in note
    assert "re-initialised (other shape, e.g. another class count): head.classification_head.cls_logits" in note
    own, coco = model.state_dict(), coco_model.state_dict()
    loaded = [key for key in own if key in coco and own[key].shape == coco[key].shape]
    assert all(torch.equal(own[key], coco[key]) for key in loaded) and len(loaded) > 100
    assert torch.equal(model.head.classification_head.cls_logits.bias, fresh_bias)  # prior-probability bias
    assert fresh_bias[0].item() == pytest.approx(-math.log(99))


@pytest.mark.slow
def test_model_weights_fine_tunes_from_an_earlier_run_with_other_classes(tmp_path, tiny, capsys, one_thread):
    assert cli_main(["train", DEMO, "--output-dir", str(tmp_path / "five"), "--set", *tiny, "train.max_iters=1"]) == 0
    capsys.readouterr()
    assert cli_main(["train", DEMO, "--output-dir", str(tmp_path / "two"), "--set", *tiny, "train.max_iters=1",
                     f"model.weights={tmp_path / 'five' / 'best.pth'}", "data.subset.categories=[circle,star]"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model.weights:"))
    assert "re-initialised" in line and "cls_logits" in line and "not in the file" not in line


# ---------------------------------------------------------------- data.workers: auto
@pytest.mark.parametrize("load_ms, step_ms, cores, expected", [
    (27, 650, 2, 0),      # the demo on 2 cores: workers would save 2% of a step
    (27, 650, 1, 0),      # one core: nothing to overlap with
    (100, 400, 2, 1),     # slow decoding on 2 cores: one worker, the other core computes
    (100, 400, 16, 1),    # one worker delivers a batch per 100 ms, 2x headroom for 400 ms steps
    (300, 200, 16, 3),    # loading slower than the step: enough workers to keep up, twice over
    (300, 200, 3, 2),     # ... but never more than the spare cores
    (900, 10, 64, 8),     # and at most MAX_WORKERS
])
def test_auto_workers_start_only_where_they_save_a_share_of_the_step(load_ms, step_ms, cores, expected):
    from detfocal.engine.workers import choose_workers

    workers, why = choose_workers(load_ms / 1000, step_ms / 1000, cores)
    assert workers == expected
    assert why.startswith(f"data.workers: auto chose {expected} (loading a batch takes {load_ms} ms, a step {step_ms} ms")


def test_measuring_the_load_time_leaves_every_random_stream_as_it_was():
    import random

    import numpy as np

    from detfocal.engine.workers import time_batch_load

    class Noisy:
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return random.random() + np.random.rand() + torch.rand(()).item()

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    seconds, batch = time_batch_load(Noisy(), 3, list)
    assert seconds > 0 and len(batch) == 3
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_step_estimate_leaves_the_model_and_its_batchnorm_statistics_alone():
    from detfocal.engine.workers import resolve_workers, time_step
    from detfocal.modeling.retinanet import build_retinanet

    model = build_retinanet(2, "resnet18", fpn_channels=32, min_size=64, max_size=64).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert time_step(model, [torch.rand(3, 64, 64)], amp_dtype=None, backward_factor=3.0) > 0
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert resolve_workers(3, [], 2, list, model, torch.device("cpu")) == (3, None)
    assert resolve_workers("auto", [], 2, list, model, torch.device("cpu")) == (0, "data.workers: auto chose 0 (no images)")
    workers, why = resolve_workers("auto", [1, 2], 2, list, model, torch.device("cpu"), deterministic=True)
    assert workers == 0 and "train.deterministic" in why


# ---------------------------------------------------------------------------------------------
# callbacks, signals, run identity, and checkpoints of older releases


class RecordingCallback:
    """Records every event it receives, with the loop's iteration at that moment."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_run_start(self, run):
        self.events.append(("run_start", run.iteration, run.total_iters))

    def on_step_end(self, run, logs):
        self.events.append(("step_end", run.iteration, dict(logs)))

    def on_evaluation_end(self, run, stats):
        self.events.append(("evaluation_end", run.iteration, dict(stats)))

    def on_epoch_end(self, run, record):
        self.events.append(("epoch_end", run.iteration, dict(record)))

    def on_checkpoint(self, run, path, kind):
        self.events.append(("checkpoint", run.iteration, kind, Path(path).is_file()))

    def on_run_end(self, run, summary):
        self.events.append(("run_end", run.iteration, dict(summary)))


@pytest.mark.slow
def test_a_user_callback_receives_every_event_of_a_two_iteration_run(tmp_path, tiny, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recorder = RecordingCallback()
    summary = detfocal.train(DEMO, tmp_path / "run", overrides=[*tiny, "train.max_iters=2"], callbacks=[recorder])
    names = [event[0] for event in recorder.events]
    # last.pth is written before the evaluation (a kill during it loses no training) and again after it.
    assert names == ["run_start", "step_end", "step_end", "checkpoint", "evaluation_end", "checkpoint", "checkpoint",
                     "epoch_end", "run_end"]
    assert recorder.events[0][1:] == (0, 2)
    steps = [event for event in recorder.events if event[0] == "step_end"]
    assert [event[1] for event in steps] == [1, 2]
    assert {"loss", "classification", "bbox_regression", "grad_norm", "lr", "images_per_s"} <= set(steps[0][2])
    evaluation = next(event for event in recorder.events if event[0] == "evaluation_end")
    assert set(STAT_NAMES) <= set(evaluation[2]) and evaluation[2]["AP"] == summary["AP"]
    assert [event[2:] for event in recorder.events if event[0] == "checkpoint"] == [("last", True), ("best", True),
                                                                                     ("last", True)]
    assert recorder.events[-1][2]["stopped"] == "max_iters" and recorder.events[-1][2]["AP"] == summary["AP"]
    # The built-in metrics.jsonl and TensorBoard callbacks saw the same steps.
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2]
    assert [r["loss"] for r in records if r["type"] == "train"] == [event[2]["loss"] for event in steps]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [event.value for event in events.Scalars("train/loss")] == pytest.approx([e[2]["loss"] for e in steps])


def test_callback_on_the_command_line_is_module_colon_name(tmp_path, monkeypatch, capsys):
    from detfocal.cli import load_callback

    (tmp_path / "my_tracker.py").write_text("class Tracker:\n    def on_run_end(self, run, summary):\n        pass\n"
                                            "instance = Tracker()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert type(load_callback("my_tracker:Tracker")).__name__ == "Tracker"
    assert load_callback("my_tracker:instance").__class__.__name__ == "Tracker"
    for spec, message in (("my_tracker", "expected MODULE:NAME"), ("my_tracker:Nope", "has no 'Nope'"),
                          ("no_such_module:X", "no_such_module")):
        with pytest.raises(ValueError, match=message):
            load_callback(spec)
    assert cli_main(["train", DEMO, "--callback", "my_tracker:Nope"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_sigterm_and_sigusr1_stop_at_the_step_boundary_save_and_resume_exactly(tmp_path, tiny, one_thread,
                                                                                monkeypatch, capsys, signum):
    common = tiny + ["train.epochs=2", "train.batch_size=2", "train.deterministic=true", "eval.interval=5"]
    assert cli_main(["train", DEMO, "--output-dir", str(tmp_path / "straight"), "--set", *common]) == 0
    step = loop_module.train_step

    def signalled_step(*args, **kwargs):
        if kwargs["iteration"] == 2:
            signal.raise_signal(signum)
        return step(*args, **kwargs)

    monkeypatch.setattr(loop_module, "train_step", signalled_step)
    out = tmp_path / "resumed"
    assert cli_main(["train", DEMO, "--output-dir", str(out), "--set", *common]) == 128 + signum
    err = capsys.readouterr().err
    assert f"{signal.Signals(signum).name}: stopping after this step" in err and "interrupted: saved" in err
    assert load_checkpoint(out / "interrupted.pth")["iteration"] == 3
    monkeypatch.setattr(loop_module, "train_step", step)
    assert cli_main(["train", DEMO, "--output-dir", str(out), "--resume", "--set", *common]) == 0
    _same_weights(tmp_path / "straight" / "last.pth", out / "last.pth")
    assert signal.getsignal(signum) is signal.SIG_DFL  # the handler is gone after the run


@pytest.mark.slow
def test_resume_after_a_kill_drops_replayed_records_and_a_partial_last_line(tmp_path, tiny, one_thread):
    out = tmp_path / "run"
    common = [*tiny, "train.epochs=2"]
    detfocal.train(DEMO, out, overrides=[*common, "train.max_iters=2"])  # epoch 0: last.pth at step 2
    with open(out / "metrics.jsonl", "a") as handle:  # steps 3-4 logged, then killed mid-append
        handle.write('{"type": "train", "step": 3, "loss": 9}\n{"type": "train", "step": 4, "loss": 9}\n{"type": "tr')
    summary = detfocal.train(DEMO, out, resume=True, overrides=common)
    assert summary["iterations"] == 4 and (out / "results.json").is_file() and (out / "loss.png").is_file()
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
    assert steps == [1, 2, 3, 4] and all(r["loss"] != 9 for r in read_metrics(out / "metrics.jsonl"))


@pytest.mark.slow
def test_resuming_another_runs_checkpoint_into_a_folder_holding_a_run_is_refused(tmp_path, tiny, one_thread, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        assert cli_main(["train", DEMO, "--output-dir", str(out), "--set", *tiny, "train.max_iters=1"]) == 0
    before = {name: _sha256(second / name) for name in ("last.pth", "metrics.jsonl")}
    capsys.readouterr()
    assert cli_main(["train", DEMO, "--output-dir", str(second), "--resume", str(first / "last.pth"), "--set",
                     *tiny, "train.max_iters=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is from another run" in err and "--overwrite" in err
    assert {name: _sha256(second / name) for name in before} == before
    # Its own checkpoint, by path or by the run id stored in it, resumes.
    run_id = (second / "run.json").read_text()
    assert load_checkpoint(second / "last.pth")["run_id"] in run_id
    assert cli_main(["train", DEMO, "--output-dir", str(second), "--resume", "--set", *tiny, "train.max_iters=2"]) == 0


@pytest.mark.slow
def test_overwrite_with_a_bad_data_path_leaves_the_old_run_untouched(tmp_path, tiny, one_thread, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", DEMO, "--output-dir", str(out), "--set", *tiny, "train.max_iters=1"]) == 0
    before = {path.name: _sha256(path) for path in out.iterdir() if path.is_file() and path.name != "log.txt"}
    bad = ["data.shapes=null", f"data.train={{images: {tmp_path}, annotations: {tmp_path}/typo.json}}",
           f"data.val={{images: {tmp_path}, annotations: {tmp_path}/typo.json}}"]
    assert cli_main(["train", DEMO, "--output-dir", str(out), "--overwrite", "--set", *tiny, *bad]) == 2
    assert "typo.json" in capsys.readouterr().err
    after = {path.name: _sha256(path) for path in out.iterdir() if path.is_file() and path.name != "log.txt"}
    assert after == before


@pytest.mark.slow
def test_a_checkpoint_written_before_the_engine_restructure_still_resumes_exactly(tmp_path, one_thread, monkeypatch):
    """tests/data/legacy holds a run interrupted at step 3, written by commit b82acb6, and the final
    weights of the same run left alone (tests/data/legacy/make_legacy.py made both)."""
    legacy = Path(__file__).parent / "data" / "legacy"
    monkeypatch.syspath_prepend(str(legacy))
    from make_legacy import overrides

    out = tmp_path / "resumed"
    summary = detfocal.train(DEMO, out, resume=legacy / "interrupted_at_step3.pth",
                             overrides=overrides(tmp_path / "shapes"))
    assert summary["iterations"] == 8
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
    assert steps == [4, 5, 6, 7, 8]
    got = load_checkpoint(out / "last.pth")["model"]
    expected = torch.load(legacy / "full_run_final_model.pth", weights_only=True)
    assert got.keys() == expected.keys()
    for key, value in expected.items():  # identical on the CPU that wrote it; other CPUs round differently
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_full_disk_while_saving_a_checkpoint_is_one_oserror_naming_the_file(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "last.pth", {"iteration": 1})
    real_save = torch.save

    def full_disk(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*last.pth: .*file write failed; the previous file is intact"):
        save_checkpoint(tmp_path / "last.pth", {"iteration": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(tmp_path / "last.pth")["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary left behind


@pytest.mark.slow
def test_the_mlflow_how_to_callback_logs_a_run_offline(tmp_path, tiny, one_thread, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    page = (ROOT / "docs" / "how-to" / "callbacks.md").read_text()
    code = next(block for block in page.split("```python\n")[1:] if "class MlflowCallback" in block).split("```")[0]
    namespace: dict = {}
    exec(compile(code, "docs/how-to/callbacks.md", "exec"), namespace)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file://{tmp_path / 'mlruns'}"
    summary = detfocal.train(DEMO, tmp_path / "run", overrides=[*tiny, "train.max_iters=2"],
                             callbacks=[namespace["MlflowCallback"](tracking_uri=store)])
    client = mlflow.tracking.MlflowClient(store)
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["train.max_iters"] == "2" and runs[0].data.metrics["AP"] == summary["AP"]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2]
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id)] == ["best.pth"]


@pytest.mark.slow
def test_one_data_loader_per_run_keeps_its_worker_processes_across_epochs(tmp_path, tiny, one_thread, monkeypatch):
    from torch.utils.data import DataLoader

    from detfocal.engine import train as train_module

    built = []

    class CountingLoader(DataLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(train_module, "DataLoader", CountingLoader)
    summary = detfocal.train(DEMO, tmp_path / "run", overrides=[*tiny, "train.epochs=3", "data.workers=1",
                                                                 "eval.interval=5"])
    assert summary["iterations"] == 6 and summary["data_workers"] == 1
    assert len(built) == 2  # one for training, one for evaluation, for the whole run
    train_loader = next(loader for loader in built if loader.batch_sampler is not None
                        and hasattr(loader.batch_sampler, "iters_per_epoch"))
    assert train_loader.persistent_workers and not train_loader.pin_memory  # pin_memory only on CUDA


# ---------------------------------------------------------------------------------------------
# what a hostile sweep found: preemption of the whole job, stops at epoch ends, copied checkpoints


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_with_data_workers_saves_and_exits_143(tmp_path, tiny):
    import subprocess
    import sys

    # SLURM's preemption and Ctrl-C signal every process of the job, the DataLoader workers too.
    (tmp_path / "group_kill.py").write_text(
        "import os, signal\n"
        "class KillGroupAtStep2:\n"
        "    def on_step_end(self, run, logs):\n"
        "        if run.iteration == 2:\n"
        "            os.killpg(os.getpgrp(), signal.SIGTERM)\n")
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "detfocal", "train", DEMO, "--output-dir", str(out), "--callback",
            "group_kill:KillGroupAtStep2", "--set", *tiny, "train.epochs=2", "train.batch_size=2", "data.workers=1"]
    done = subprocess.run(argv, cwd=tmp_path, start_new_session=True, capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "interrupted: saved" in done.stderr
    assert load_checkpoint(out / "interrupted.pth")["iteration"] == 3


@pytest.mark.slow
def test_a_stop_signal_at_an_epoch_end_saves_first_and_the_resumed_run_evaluates(tmp_path, tiny, one_thread,
                                                                                 monkeypatch):
    common = tiny + ["train.epochs=2", "train.batch_size=2"]
    step = loop_module.train_step

    def signalled_step(*args, **kwargs):
        if kwargs["iteration"] == 3:  # the last step of epoch 0
            signal.raise_signal(signal.SIGTERM)
        return step(*args, **kwargs)

    monkeypatch.setattr(loop_module, "train_step", signalled_step)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        detfocal.train(DEMO, out, overrides=common)
    saved = load_checkpoint(out / "last.pth")
    assert saved["iteration"] == 4 and saved["evaluation_pending"] and not (out / "interrupted.pth").exists()
    monkeypatch.setattr(loop_module, "train_step", step)
    detfocal.train(DEMO, out, resume=True, overrides=common)
    epochs = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1] and all("AP" in r and "loss" in r for r in epochs)


@pytest.mark.slow
def test_a_stop_signal_on_the_last_step_completes_the_run(tmp_path, tiny, one_thread, monkeypatch):
    step = loop_module.train_step

    def signalled_step(*args, **kwargs):
        if kwargs["iteration"] == 1:  # the last of 2 steps
            signal.raise_signal(signal.SIGTERM)
        return step(*args, **kwargs)

    monkeypatch.setattr(loop_module, "train_step", signalled_step)
    summary = detfocal.train(DEMO, tmp_path / "run", overrides=tiny)
    assert summary["stopped"] == "completed" and (tmp_path / "run" / "results.json").is_file()
    assert (tmp_path / "run" / "metrics.json").is_file()


@pytest.mark.slow
def test_a_callbacks_stop_request_mid_epoch_waits_for_the_epoch_end_checkpoint(tmp_path, tiny, one_thread):
    class StopAtStep1:
        def on_step_end(self, run, logs):
            if run.iteration == 1:
                run.request_stop("enough")

    common = tiny + ["train.epochs=3", "train.batch_size=2"]
    summary = detfocal.train(DEMO, tmp_path / "run", overrides=common, callbacks=[StopAtStep1()])
    assert summary["stopped"] == "enough" and summary["iterations"] == 4  # the end of epoch 0
    assert load_checkpoint(tmp_path / "run" / "last.pth")["iteration"] == 4


@pytest.mark.slow
def test_the_epoch_mean_loss_after_a_mid_epoch_resume_covers_the_whole_epoch(tmp_path, tiny, one_thread,
                                                                            monkeypatch):
    common = tiny + ["train.epochs=1", "train.batch_size=2", "train.deterministic=true"]
    detfocal.train(DEMO, tmp_path / "straight", overrides=common)
    step = loop_module.train_step

    def interrupted_step(*args, **kwargs):
        if kwargs["iteration"] == 1:
            signal.raise_signal(signal.SIGINT)
        return step(*args, **kwargs)

    monkeypatch.setattr(loop_module, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        detfocal.train(DEMO, tmp_path / "resumed", overrides=common)
    monkeypatch.setattr(loop_module, "train_step", step)
    detfocal.train(DEMO, tmp_path / "resumed", resume=True, overrides=common)
    straight, resumed = ([r for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["type"] == "epoch"][0]
                         for name in ("straight", "resumed"))
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-6)


@pytest.mark.slow
def test_an_overwrite_killed_before_its_first_checkpoint_gets_the_old_run_back_next_time(tmp_path, tiny, one_thread):
    out = tmp_path / "run"
    detfocal.train(DEMO, out, overrides=[*tiny, "train.max_iters=1"])
    before = _sha256(out / "last.pth")
    # What a kill -9 after the move aside leaves: the old run in .previous-run, the new run's first files.
    aside = out / ".previous-run"
    aside.mkdir()
    for name in ("last.pth", "best.pth", "metrics.jsonl", "run.json", "config.yaml"):
        os.replace(out / name, aside / name)
    (out / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 9}\n')
    with pytest.raises(ValueError, match="holds a run"):  # the old run is back, so a plain start is refused
        detfocal.train(DEMO, out, overrides=[*tiny, "train.max_iters=1"])
    assert _sha256(out / "last.pth") == before and not aside.exists()
    assert all(r.get("loss") != 9 for r in read_metrics(out / "metrics.jsonl"))
    aside.mkdir()
    (aside / "mine.txt").write_text("the user's")
    with pytest.raises(ValueError, match=r"\.previous-run holds files detfocal did not put there \(mine.txt\)"):
        detfocal.train(DEMO, out, resume=True, overrides=[*tiny, "train.max_iters=1"])
    assert (aside / "mine.txt").read_text() == "the user's"


@pytest.mark.slow
def test_another_runs_checkpoint_copied_into_the_folder_is_refused(tmp_path, tiny, one_thread):
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        detfocal.train(DEMO, out, overrides=[*tiny, "train.max_iters=1"])
    import shutil

    shutil.copy(first / "last.pth", second / "copied.pth")
    with pytest.raises(ValueError, match="is from another run"):
        detfocal.train(DEMO, second, resume=second / "copied.pth", overrides=[*tiny, "train.max_iters=2"])


def test_resume_skips_an_unreadable_checkpoint_with_a_warning(tmp_path, caplog):
    save_checkpoint(tmp_path / "last.pth", {"iteration": 4})
    (tmp_path / "interrupted.pth").write_bytes(b"")
    assert choose_resume_checkpoint(tmp_path) == tmp_path / "last.pth"
    assert "interrupted.pth" in caplog.text and "is empty (0 bytes)" in caplog.text
    (tmp_path / "last.pth").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="no checkpoint in .* can be read"):
        choose_resume_checkpoint(tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    ({"overrides": "train.lr=1"}, "overrides: expected a list of 'key=value' strings"),
    ({"resume": 0}, "resume: expected a checkpoint path, True or None"),
    ({"callbacks": "abc"}, "callbacks: expected a list of callback objects"),
    ({"callbacks": [RecordingCallback]}, "RecordingCallback is a class; pass an instance"),
    ({"callbacks": [object()]}, "has none of the events on_run_start"),
])
def test_train_refuses_arguments_that_would_fail_late_or_do_nothing(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        detfocal.train(DEMO, tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


def test_a_torch_save_failure_caused_by_a_full_disk_is_one_oserror(tmp_path, monkeypatch):
    def full_disk(obj, handle, *args, **kwargs):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4240")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*last.pth: No space left on device"):
        save_checkpoint(tmp_path / "last.pth", {"iteration": 2})
