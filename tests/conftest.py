"""Shared test setup and helpers: seeding, one-thread runs, tiny training overrides."""
import os
from pathlib import Path

# libgomp threads spin while waiting; when subprocess tests (DDP, tools) share the cores the
# spinning starves the real work. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# cuBLAS computes matrix products deterministically only with a fixed workspace, which must be
# set before its first use: the exact-resume tests compare weights bit for bit on "cuda" too.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "shapes_retinanet_r18.yaml"

SHARED_COCO = ROOT.parent / "shared" / "data" / "coco_val2014_100"
TEST_DATA = Path(__file__).resolve().parent / "data"


NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[NO_CUDA, pytest.mark.cuda])])
def device(request) -> str:
    """The device of a numeric test: "cpu" always, and "cuda" where one is present (skipped with the
    reason elsewhere). The same test function runs on both; ``pytest -m cuda`` selects the "cuda" ones."""
    return request.param


@pytest.fixture
def run_device(device, monkeypatch) -> str:
    """``device`` for a whole run of ``detfocal.train``, which picks its device itself (``init_distributed``:
    cuda:0 where CUDA is present). On "cpu" the run is kept on the CPU even where a GPU is present."""
    if device == "cpu" and torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return device


@pytest.fixture(autouse=True)
def _fresh_logging():
    """Each test starts with the library's loggers unconfigured, as in a new process: a command run
    by an earlier test (``cli.main`` installs a console handler) must not print into the next."""
    import logging

    logger = logging.getLogger("detfocal")
    yield
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


@pytest.fixture
def one_thread():
    """In-process runs of tiny models: one thread is as fast, and does not fight other processes
    for the cores (libgomp's spinning threads slow down many-fold when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny(tmp_path) -> list[str]:
    """Overrides of the demo config for a run of a few seconds: 64 px shapes (8 train, 4 val images,
    generated under tmp_path/shapes), a thin FPN, one head conv, fp32, no workers, batch 4."""
    shapes_root = tmp_path / "shapes"
    return [f"data.shapes={{root: {shapes_root}, num_train: 8, num_val: 4, image_size: 64, min_object_size: 6, "
            f"max_objects: 3}}", "model.min_size=64", "model.max_size=64", "model.fpn_channels=32",
            "model.head.num_convs=1", "model.head.norm=none", "train.batch_size=4", "train.epochs=1",
            "train.warmup_iters=2", "train.amp=off", "train.log_interval=1", "data.workers=0", "eval.batch_size=4",
            "eval.interval=1"]


# Loss scales a GradScaler uses: its start (2^16), the extremes it may reach in training, and 1.
LOSS_SCALES = (1.0, 2.0 ** 10, 2.0 ** 16, 2.0 ** 24)


def assert_half_grad_matches_float64(loss_fn, inputs: torch.Tensor, scale: float) -> None:
    """The gradient of ``loss_fn(inputs) * scale`` for fp16/bf16 ``inputs`` is float64's, rounded once.

    Both gradients are computed on ``inputs``' device (``loss_fn`` must hold its other
    tensors there too).

    Unscaled, it must match the float64 gradient within 2 ulp of the dtype plus the smallest
    subnormal / scale; it must be inf exactly where the float64 value times the scale rounds
    to inf, and nonzero wherever that product is at least the smallest subnormal.
    """
    dtype = inputs.dtype
    info = torch.finfo(dtype)
    smallest_subnormal = info.smallest_normal * info.eps
    x = inputs.detach().clone().requires_grad_(True)
    loss = loss_fn(x)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype,
                              device=loss.device).reshape(loss.shape)  # non-uniform for "none"
    ((loss * upstream).sum() * scale).backward()
    x64 = inputs.detach().double().requires_grad_(True)
    loss64 = loss_fn(x64)
    (loss64 * upstream.double()).sum().backward()
    got, ref = x.grad, x64.grad
    assert got.dtype == dtype
    scaled_ref = ref * scale
    overflow = scaled_ref.to(dtype).isinf()
    assert torch.equal(got.isinf(), overflow), f"inf where float64 x {scale:g} is finite, or the reverse"
    unscaled = got.double()[~overflow] / scale
    error = (unscaled - ref[~overflow]).abs()
    bound = 2 * info.eps * ref[~overflow].abs() + smallest_subnormal / scale
    worst = int((error - bound).argmax()) if error.numel() else 0
    assert bool((error <= bound).all()), (f"scale {scale:g}: {int((error > bound).sum())} gradients off, e.g. "
                                          f"{unscaled[worst].item()!r} for float64 {ref[~overflow][worst].item()!r}")
    must_be_nonzero = scaled_ref.abs() >= smallest_subnormal
    assert bool((got[must_be_nonzero] != 0).all()), f"scale {scale:g}: gradients flushed to zero"


def backward_ops_on(shape, loss_fn):
    """Names of the ops that touched data of tensors of ``shape`` during ``loss_fn().backward()``."""
    from torch.profiler import profile

    loss = loss_fn()
    with profile(record_shapes=True) as prof:
        loss.backward()
    return sorted({e.name for e in prof.events() if any(list(s) == list(shape) for s in e.input_shapes or [])
                   and e.name.startswith("aten::") and e.name not in ("aten::detach", "aten::view")})
