"""detfocal.benchmark: the profile attribution, the torchvision twin of the train case, its table."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from detfocal import benchmark
from detfocal.benchmark import profile as bprofile
from detfocal.benchmark import runner, training
from detfocal.config import config_to_yaml, load_config

from conftest import DEMO

BACKWARD = bprofile.BACKWARD_PREFIX


def profiled_steps(steps: int = 2):
    """A conv labelled "A" and a linear layer labelled "B" (module hooks), trained ``steps`` steps."""
    torch.manual_seed(0)
    conv, linear = nn.Conv2d(3, 4, 3), nn.Linear(4 * 14 * 14, 2)
    bprofile._label_module(conv, "A")
    bprofile._label_module(linear, "B")
    optimizer = torch.optim.SGD([*conv.parameters(), *linear.parameters()], lr=0.1)
    images = torch.rand(2, 3, 16, 16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function(bprofile.STEP_RANGE):
                optimizer.zero_grad()
                linear(conv(images).flatten(1)).square().sum().backward()
                optimizer.step()
    return prof.events()


def test_profile_rows_partition_the_steps_and_backward_follows_the_forward_label(one_thread):
    events = profiled_steps()
    rows, step_us, steps = bprofile.attribute_profile(events, ["A", "B"])
    assert steps == 2
    assert sum(total for total, _ in rows.values()) == pytest.approx(step_us, rel=1e-6)

    def backward_of(*names):
        return sum(e.cpu_time_total for e in events if e.name in {BACKWARD + name for name in names})

    # The profiler's own backward nodes, by name: the conv's is A's, the linear layer's (addmm and
    # the weight's transpose) are B's, whatever thread order and sequence numbers they came with.
    assert rows["A"][1] == pytest.approx(backward_of("ConvolutionBackward0"), rel=1e-6)
    assert rows["B"][1] == pytest.approx(backward_of("AddmmBackward0", "TBackward0"), rel=1e-6)
    forward_a = sum(e.cpu_time_total for e in events if e.name == "A")
    assert rows["A"][0] - rows["A"][1] == pytest.approx(forward_a, rel=1e-6)
    assert rows["optimizer step"][0] > 0 and rows[bprofile.OTHER][1] > 0  # SGD's range; AccumulateGrad, square


@pytest.mark.slow
def test_profile_case_of_a_tiny_config_reports_every_component(tmp_path, tiny):
    config = tmp_path / "tiny.yaml"
    config.write_text(config_to_yaml(load_config(DEMO, tiny)))
    result = bprofile.profile_case({"config": str(config), "batch": 2, "repeats": 1})
    rows = result["rows"]
    for name in bprofile.PROFILE_ROWS:
        assert rows[name][0] > 0, name
    assert sum(ms for ms, _ in rows.values()) - rows[bprofile.DATA][0] == pytest.approx(result["step_ms"], rel=1e-6)
    assert rows["backbone"][1] > 0 and rows["head convs"][1] > 0  # their backward found its forward label
    assert 0 < result["decode_ms_per_image"] < result["data_ms_per_image"]
    table = bprofile.profile_table(result)
    assert "| matching |" in table and "Non-convolution share" in table


def test_profile_case_names_a_missing_config():
    with pytest.raises(FileNotFoundError, match="--config: missing.yaml does not exist"):
        benchmark.main(["--cases", "profile", "--config", "missing.yaml"])


@pytest.mark.parametrize("head", [{"type": "focal"}, {"type": "focal", "num_convs": 2, "norm": "gn"}],
                         ids=["stock-head", "gn-2-convs"])
def test_torchvision_twin_is_stock_torchvision_with_the_same_weights_and_detections(head):
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import RetinaNetClassificationHead
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    from detfocal.modeling.retinanet import build_retinanet

    torch.manual_seed(0)
    model = build_retinanet(3, "resnet18", fpn_channels=64, min_size=128, max_size=128, head=head,
                            score_thresh=0.0).eval()
    twin = training.torchvision_twin(model)
    assert type(twin) is RetinaNet and type(twin.anchor_generator) is AnchorGenerator
    assert type(twin.head.classification_head) is RetinaNetClassificationHead
    assert type(twin.backbone.fpn.extra_blocks) is LastLevelP6P7
    assert not twin.training
    images = [torch.rand(3, 128, 128)]
    with torch.no_grad():
        ours, theirs = model(images)[0], twin(images)[0]
    torch.testing.assert_close(theirs["boxes"], ours["boxes"])
    torch.testing.assert_close(theirs["scores"], ours["scores"])


def test_train_table_pairs_rows_and_says_when_fp32_is_the_default():
    rows = [{"backbone": "resnet18", "size": 256, "batch": 8, "precision": "fp32", "impl": impl, "images_per_s": ips,
             "amp": "fp32", "auto_note": "precision: fp32 (auto: cpu without native bf16)"}
            for impl, ips in (("torchvision", 1.0), ("detfocal", 1.25))]
    table = training.train_table(rows)
    assert "| resnet18 | 256 | 8 | fp32 | 1.00 | 1.25 | 1.25 |" in table
    assert "default precision here is fp32 (train.amp: auto; auto: cpu without native bf16)" in table
    bf16 = [{**row, "precision": "default", "amp": "bfloat16", "images_per_s": 3.0 * (1 + i)}
            for i, row in enumerate(rows)]
    assert "resnet18: detfocal in the default precision (bfloat16) is 6.00x torchvision in fp32" in \
        training.train_table(rows + bf16)


@pytest.mark.slow
def test_inference_case_of_a_tiny_config_times_every_stage_within_the_total(tmp_path, tiny):
    from detfocal.benchmark import evaluation

    config = tmp_path / "tiny.yaml"
    config.write_text(config_to_yaml(load_config(DEMO, tiny)))
    result = evaluation.inference_case({"config": str(config), "num_images": 6, "repeats": 1, "checkpoint": None})
    rows = result["rows"]
    for name in evaluation.INFERENCE_ROWS:
        assert rows[name] >= 0, name
    for name in ("backbone + FPN", "head convs", "post-processing (score filter, per-level top-k, batched_nms)"):
        assert rows[name] > 0, name
    assert sum(rows.values()) <= 1000 * result["seconds"]  # stages never overlap, so they cannot exceed the pass
    assert result["num_images"] == 6 and result["images_per_s"] == pytest.approx(6 / result["seconds"])
    assert "| post-processing (score filter, per-level top-k, batched_nms) |" in evaluation.inference_table(result)


def test_inference_case_names_a_missing_checkpoint():
    with pytest.raises(FileNotFoundError, match="--checkpoint: nowhere.pth does not exist"):
        benchmark.main(["--cases", "inference", "--checkpoint", "nowhere.pth"])


def test_a_failing_case_is_an_error_row_and_the_next_case_still_runs():
    lines = []
    results = runner.worker([{"kind": "nope", "case": "loss"},
                             {"kind": "eval", "case": "eval", "impl": "faster_coco_eval", "repeats": 1,
                              "data_dir": "tests/data"}], send=lines.append)
    assert results[0] == {"error": "ValueError: unknown case kind 'nope'"}
    assert results[1]["AP"] == pytest.approx(0.50458, abs=1e-5)
    assert [line.split(" ", 1)[0] + " " for line in lines] == [runner.PROGRESS, runner.RESULT] * 2


def test_a_case_restores_the_environment_it_changed(monkeypatch):
    monkeypatch.setenv("DETFOCAL_COMPILE", "auto")
    [result] = runner.worker([{"kind": "loss", "case": "loss", "impl": "detfocal_eager", "device": "cpu",
                               "batch": 1, "num_anchors": 400, "num_classes": 3, "repeats": 1}], send=print)
    assert result["backend"]["mode"] == "0"  # the case ran eager ...
    assert os.environ["DETFOCAL_COMPILE"] == "auto"  # ... and the next case sees the user's setting


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats: expected an int >= 1, got 0"),
    (["--repeats", "-3"], "--repeats: expected an int >= 1, got -3"),
    (["--threads", "0"], "--threads: expected an int >= 1, got 0"),
    (["--timeout", "0"], "--timeout: expected seconds > 0, got 0.0"),
    (["--cases", "loss,nope"], "--cases: unknown or no case(s) ['nope']"),
    (["--device", "tpu"], "--device: expected cpu or cuda, got 'tpu'"),
    (["--cases", "gpu,loss"], "--cases: gpu runs alone (its steps run the other cases it needs), got gpu,loss"),
    (["--cases", "gpu", "--device", "cpu"], "--cases gpu --device cpu is the dry run of the GPU check: add --quick"),
])
def test_bad_benchmark_arguments_are_one_line_before_any_case_runs(argv, message, capsys, monkeypatch):
    from detfocal.cli import main as cli_main

    monkeypatch.setattr(runner, "run_cases", lambda *args: pytest.fail("a case ran"))
    assert cli_main(["benchmark", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {message}"), err


@pytest.mark.parametrize("option", ["--checkpoint", "--config"])
def test_a_folder_given_as_checkpoint_or_config_is_named_a_folder(tmp_path, capsys, option):
    from detfocal.cli import main as cli_main

    assert cli_main(["benchmark", "--cases", "inference", option, str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {option}: {tmp_path} is a folder, expected a file") and "\n" not in err


def test_a_folder_given_as_json_is_refused_before_any_case_runs(tmp_path, capsys, monkeypatch):
    from detfocal.cli import main as cli_main

    monkeypatch.setattr(runner, "run_cases", lambda *args: pytest.fail("a case ran"))
    assert cli_main(["benchmark", "--cases", "loss", "--json", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --json {tmp_path} is a folder, expected a file"


def test_default_inputs_are_the_shipped_demo_config_and_the_checkouts_coco_sample():
    defaults = benchmark.default_inputs()
    assert defaults.config.resolve() == Path(DEMO).resolve() and defaults.config.is_file()
    assert any((folder / "instances_val2014_100.json").is_file() for folder in defaults.coco_sample_dirs)


# ----------------------------------------------------------------------------------------------
# The GPU check (--cases gpu, tools/gpu_check.sh)


@pytest.mark.parametrize("argv", [["--cases", "gpu"], ["--cases", "gpu", "--device", "cuda", "--quick"]])
def test_gpu_check_without_cuda_is_one_line_before_any_step_runs(argv, capsys, monkeypatch):
    from detfocal.benchmark import gpu
    from detfocal.cli import main as cli_main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "run_gpu_check", lambda **kwargs: pytest.fail("a step ran"))
    assert cli_main(["benchmark", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == ("error: --cases gpu: no CUDA device here (torch.cuda.is_available() is False); "
                                    "the GPU check needs one (--device cpu --quick runs it dry on the CPU)")
    assert "GPU check" not in captured.out


def test_gpu_check_kills_a_step_at_its_time_limit_with_its_children(tmp_path):
    import signal
    import sys
    import time
    from pathlib import Path

    from detfocal.benchmark import gpu

    grandchild = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; " \
                 "time.sleep(60)']); print(p.pid, flush=True); time.sleep(60)"
    start = time.monotonic()
    run = gpu._run([sys.executable, "-c", grandchild], 3.0, tmp_path / "step.log")
    assert run["timed_out"] and run["returncode"] is None and time.monotonic() - start < 20
    pid = int(run["tail"][0])
    for _ in range(50):  # killed with its process group; reparented and reaped by init shortly after
        stat = Path(f"/proc/{pid}/stat")
        if not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the step's own child outlived its time limit")
    assert "killed after" in gpu._failure(run)


def _epoch_records(step_seconds, batch=8, epoch=0, first_step=1, skipped=None):
    """metrics.jsonl train records of one epoch whose steps took ``step_seconds`` (log_interval 1)."""
    records, elapsed = [], 0.0
    for index, seconds in enumerate(step_seconds):
        elapsed += seconds
        records.append({"type": "train", "epoch": epoch, "step": first_step + index, "loss": 1.0,
                        "images_per_s": batch * (index + 1) / elapsed,
                        "skipped_steps": (skipped or {}).get(first_step + index, 0)})
    return records


def test_steady_images_per_s_is_the_rate_after_the_first_quarter_of_the_longest_epoch():
    from detfocal.benchmark import gpu

    # 25 slow warm-up steps, then 0.01 s a step at batch 8: 800 images/s; a short second epoch at 100.
    records = _epoch_records([0.1] * 25 + [0.01] * 75) + _epoch_records([0.08] * 5, epoch=1, first_step=101)
    assert gpu.steady_images_per_s(records) == pytest.approx(800.0, rel=1e-9)
    assert records[99]["images_per_s"] < 300  # what the last record alone would say


def test_train_summary_counts_skipped_steps_and_finds_the_last_one():
    from detfocal.benchmark import gpu

    skipped = {step: 1 if step < 3 else 2 if step < 7 else 3 for step in range(1, 41)}
    records = _epoch_records([0.01] * 40, skipped=skipped)
    records[10]["loss"] = float("nan")
    summary = gpu.train_summary(records + [{"type": "epoch", "epoch": 0, "step": 40}])
    assert (summary["iterations"], summary["skipped_steps"], summary["last_skipped_step"]) == (40, 3, 7)
    assert summary["finite"] is False
    assert gpu.train_summary([])["error"] == "metrics.jsonl holds no train record"


def test_gpu_table_marks_each_target_met_missed_or_failed():
    from detfocal.benchmark.gpu_report import gpu_table

    def loss_row(dtype, label, ms):
        return {"dtype": dtype, "label": label, "impl": "x", "batch": 2, "num_anchors": 10, "num_classes": 80,
                "median_ms": ms, "peak_extra_mb": 1.0}

    loss = [loss_row("fp32", "compiled head", 2.0), loss_row("fp32", "torchvision's head", 30.0),
            loss_row("fp32", "one sigmoid pass", 1.0), loss_row("fp16", "compiled head", 4.0),
            loss_row("fp16", "torchvision's head", 30.0), loss_row("fp16", "one sigmoid pass", 1.0)]
    train = [{"amp": "auto", "processes": 1, "iterations": 200, "images_per_s": 900.0, "skipped_steps": 4,
              "last_skipped_step": 30, "finite": True, "final_loss": 0.5, "seconds": 20.0},
             {"amp": "bf16", "processes": 1, "iterations": 200, "images_per_s": 800.0, "skipped_steps": 0,
              "last_skipped_step": 0, "finite": True, "final_loss": 0.5, "seconds": 20.0}]
    step = [{"impl": "torchvision", "precision": "fp32", "batch": 8, "images_per_s": 100.0, "peak_extra_mb": 1.0},
            {"impl": "detfocal", "precision": "fp32", "amp": "fp32", "batch": 8, "images_per_s": 120.0,
             "peak_extra_mb": 1.0}]
    details = {"device": "cuda", "quick": False, "tests": {"status": "failed", "counts": {"passed": 3, "failed": 1},
                                                           "failed": ["FAILED tests/test_x.py::test_y[cuda]"],
                                                           "seconds": 9.0},
               "loss": loss, "train": train, "step": step,
               "nccl": {"status": "skipped", "why": "1 CUDA device(s); the two-process NCCL run needs 2"}}
    rows = {(row.split(" | ")[0].strip("| "), row.split(" | ")[1]): row.split(" | ")[-1].strip(" |")
            for row in gpu_table(details).splitlines()[2:]}
    assert rows[("tests", "pytest -m cuda tests")] == "FAILED"
    assert rows[("loss", "fp32 compiled head, [2, 10, 80]")] == "ok"  # 15x torchvision, 2x a sigmoid pass
    assert rows[("loss", "fp16 compiled head, [2, 10, 80]")] == "MISS"  # 7.5x torchvision, 4x a sigmoid pass
    assert rows[("train", "200 demo iterations, train.amp=auto")] == "MISS"  # a skip at step 30
    assert rows[("train", "200 demo iterations, train.amp=bf16")] == "ok"
    assert rows[("step", "demo step, batch 8, fp32: detfocal vs torchvision")] == "ok"
    assert rows[("nccl", "torchrun --nproc_per_node=2")] == "-"
    dry = gpu_table({**details, "device": "cpu", "quick": True})
    assert all(row.endswith(("| - |", "| FAILED |")) for row in dry.splitlines()[2:])  # a dry run has no targets

