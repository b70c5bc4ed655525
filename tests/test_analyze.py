"""detfocal.evaluation.analysis and ``detfocal analyze``: every anchor's loss at several gammas, matched as
training matches, and every number of the table, the curves and the histogram against float64."""
from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

import detfocal
from detfocal.cli import main as cli_main
from detfocal.evaluation.analysis import (GAMMAS, analysis_gammas, anchor_focal_loss, anchor_logits_and_labels,
                                          collect_anchor_losses, cumulative_loss, hardest_fraction,
                                          run_focal_parameters, summarize)
from detfocal.evaluation.analysis_plots import (OUTPUT_NAMES, check_outputs, format_table, gradient_histograms,
                                                summary_sentences, write_analysis)
from detfocal.losses import sigmoid_focal_loss
from detfocal.modeling import build_retinanet
from detfocal.utils._compat import Matcher

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "shapes_retinanet_r18.yaml")
NUM_CLASSES = 3
ALPHA = 0.25


# ---------------------------------------------------------------------------------------------
# A tiny model whose predictions spread over easy and hard anchors, and three images: one with a
# crowd box, one with a single box, one with none (all negatives).


@pytest.fixture
def model():
    torch.manual_seed(0)
    detector = build_retinanet(NUM_CLASSES, "resnet18", fpn_channels=32, min_size=64, max_size=64,
                               anchor_sizes=[8, 16, 32, 64, 128],
                               head={"type": "focal", "num_convs": 1, "norm": "none", "alpha": ALPHA, "gamma": 2.0})
    head = detector.head.classification_head
    # Spread the logits (about -8 to 1) so that easy and hard negatives both occur.
    nn.init.normal_(head.cls_logits.weight, std=0.3)
    nn.init.constant_(head.cls_logits.bias, -3.0)
    return detector.eval()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=generator) for _ in range(3)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 30.0, 28.0], [30.0, 34.0, 60.0, 62.0], [0.0, 40.0, 20.0, 63.0]]),
         "labels": torch.tensor([0, 2, 1]), "iscrowd": torch.tensor([0, 0, 1])},
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 54.0]]), "labels": torch.tensor([1]),
         "iscrowd": torch.tensor([0])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "iscrowd": torch.zeros(0)},
    ]
    return images, targets


def _reference_loss(x: torch.Tensor, labels: torch.Tensor, alpha: float | None, gamma: float) -> torch.Tensor:
    """FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) per class, summed per anchor, with p = 1 / (1 + e^-x) in float64."""
    x = x.double()
    p = 1.0 / (1.0 + torch.exp(-x))
    target = torch.zeros_like(x)
    rows = (labels >= 0) & (labels < x.shape[-1])
    target[rows, labels[rows]] = 1.0
    p_t = torch.where(target == 1, p, 1 - p)
    alpha_t = 1.0 if alpha is None else torch.where(target == 1, x.new_tensor(alpha), x.new_tensor(1 - alpha))
    loss = (-alpha_t * (1 - p_t) ** gamma * torch.log(p_t)).sum(dim=-1)
    return torch.where(labels == -1, 0.0, loss)


# ---------------------------------------------------------------------------------------------
# The per-anchor loss and gradient


@pytest.mark.parametrize("alpha", [ALPHA, None])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_anchor_loss_and_gradient_norm_equal_detfocals_loss_and_its_autograd_in_float64(alpha, gamma):
    logits = torch.randn(200, 4, dtype=torch.float64) * 4
    logits[0] = torch.tensor([30.0, -30.0, 12.0, -12.0])  # saturated probabilities
    labels = torch.randint(0, 5, (200,))
    labels[:10] = -1
    loss, norm = anchor_focal_loss(logits, labels, alpha=alpha, gamma=gamma, with_gradient=True)
    x = logits.clone().requires_grad_(True)
    expected = sigmoid_focal_loss(x, labels, -1 if alpha is None else alpha, gamma, "none", ignore_index=-1)
    expected.sum().backward()
    torch.testing.assert_close(loss, expected.sum(dim=-1).detach(), rtol=1e-10, atol=1e-300)
    torch.testing.assert_close(norm, x.grad.norm(dim=-1), rtol=1e-10, atol=1e-300)
    moderate = logits.abs().amax(dim=-1) < 20  # where 1 - p in float64 still has digits
    torch.testing.assert_close(loss[moderate], _reference_loss(logits, labels, alpha, gamma)[moderate], rtol=1e-9,
                               atol=0)
    assert bool((loss[:10] == 0).all() and (norm[:10] == 0).all())


def test_anchor_focal_loss_refuses_bad_alpha_gamma_and_shapes():
    logits, labels = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="alpha"):
        anchor_focal_loss(logits, labels, alpha=1.5, gamma=2.0)
    with pytest.raises(ValueError, match="gamma"):
        anchor_focal_loss(logits, labels, alpha=0.25, gamma=-1.0)
    with pytest.raises(ValueError, match="shape"):
        anchor_focal_loss(logits, labels[:3], alpha=0.25, gamma=2.0)


def test_the_runs_gamma_joins_the_standard_ones_and_alpha_comes_from_the_config(model):
    assert analysis_gammas(2.0) == GAMMAS and analysis_gammas(None) == GAMMAS
    assert analysis_gammas(5.0) == (0.0, 0.5, 1.0, 2.0, 5.0)
    assert run_focal_parameters(model, {"type": "focal", "alpha": 0.5, "gamma": 1.0}) == (0.5, 1.0)
    assert run_focal_parameters(model, {"type": "focal"}) == (ALPHA, 2.0)  # the head's own values
    assert run_focal_parameters(model, {"alpha": -1}) == (None, 2.0)


# ---------------------------------------------------------------------------------------------
# Matching as training matches


def test_labels_follow_the_iou_thresholds_low_quality_matches_and_crowd_rule(model, batch):
    images, targets = batch
    _, labels = anchor_logits_and_labels(model, images, targets)
    image_list, _ = model.transform(images)
    features = list(model.backbone(image_list.tensors).values())
    anchors = model.anchor_generator(image_list, features)[0]
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)  # torchvision's RetinaNet defaults
    crowd_ignored = 0
    for index, target in enumerate(targets):
        crowd = target["iscrowd"].bool()
        boxes, box_labels = target["boxes"][~crowd], target["labels"][~crowd]
        if len(boxes):
            matched = matcher(box_iou(boxes, anchors))
        else:
            matched = torch.full((len(anchors),), -1)
        expected = torch.where(matched >= 0, box_labels[matched.clamp(min=0)] if len(boxes) else 0,
                               torch.where(matched == -1, NUM_CLASSES, -1))
        before = expected
        for crowd_box in target["boxes"][crowd]:  # background anchors lying mostly inside a crowd box
            x1, y1 = torch.maximum(anchors[:, 0], crowd_box[0]), torch.maximum(anchors[:, 1], crowd_box[1])
            x2, y2 = torch.minimum(anchors[:, 2], crowd_box[2]), torch.minimum(anchors[:, 3], crowd_box[3])
            inside = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
            area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
            expected = torch.where((expected == NUM_CLASSES) & (inside / area >= 0.5), -1, expected)
        crowd_ignored += int(((before == NUM_CLASSES) & (expected == -1)).sum())
        assert torch.equal(labels[index], expected)
    # The case covers every kind of anchor: ignored between the thresholds and in the crowd box too.
    assert crowd_ignored > 0 and int((labels == -1).sum()) > crowd_ignored
    assert int(((labels[:2] >= 0) & (labels[:2] < NUM_CLASSES)).sum()) > 0 and bool((labels[2] == NUM_CLASSES).all())


def test_per_anchor_losses_add_up_to_the_models_own_classification_loss(model, batch):
    images, targets = batch
    result = collect_anchor_losses(model, [(images, targets)], alpha=ALPHA, gammas=(2.0,))
    image_list, resized = model.transform(images, [dict(t) for t in targets])
    features = list(model.backbone(image_list.tensors).values())
    with torch.no_grad():
        loss = model.compute_loss(resized, model.head(features), model.anchor_generator(image_list, features))
    # The head's "batch" normaliser: the batch's sum over its positive anchors.
    assert result.losses[0].sum() / result.positive.sum() == pytest.approx(loss["classification"].item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# The numbers


def test_every_number_of_the_summary_matches_a_direct_float64_computation(model, batch):
    images, targets = batch
    batches = [(images[:2], targets[:2]), (images[2:], targets[2:])]
    result = collect_anchor_losses(model, batches, alpha=ALPHA)
    summary = summarize(result)
    # The same batches: a convolution's float32 rounding may depend on the batch size.
    logits, labels = (torch.cat(parts) for parts in zip(*(anchor_logits_and_labels(model, *b) for b in batches)))

    per_image = []  # (positive, losses per gamma, max probability) of each kept anchor, image by image
    for x, y in zip(logits, labels):
        kept = y != -1
        losses = {gamma: _reference_loss(x[kept], y[kept], ALPHA, gamma).numpy() for gamma in GAMMAS}
        per_image.append(((y[kept] < NUM_CLASSES).numpy(), losses, torch.sigmoid(x[kept].double()).amax(-1).numpy()))
    num_anchors, num_ignored = labels.shape[1], (labels == -1).sum(dim=1).numpy()
    num_positive = np.array([positive.sum() for positive, _, _ in per_image])
    num_negative = num_anchors - num_positive - num_ignored
    assert summary["images"] == 3 and summary["anchors_per_image"] == num_anchors
    assert summary["positives_per_image"] == pytest.approx(num_positive.mean())
    assert summary["ignored_per_image"] == pytest.approx(num_ignored.mean())
    assert summary["negatives_per_image"] == pytest.approx(num_negative.mean())
    assert summary["negatives_per_positive"] == pytest.approx(num_negative.sum() / num_positive.sum())
    assert summary["alpha"] == ALPHA and [row["gamma"] for row in summary["per_gamma"]] == list(GAMMAS)

    for row in summary["per_gamma"]:
        gamma = row["gamma"]
        positive = np.concatenate([p for p, _, _ in per_image])
        losses = np.concatenate([l[gamma] for _, l, _ in per_image])
        probability = np.concatenate([q for _, _, q in per_image])
        total, negatives = losses.sum(), sorted(losses[~positive])
        assert row["negative_loss_share"] == pytest.approx(sum(negatives) / total, rel=1e-9)
        easy = negatives[: math.floor(0.9 * len(negatives))]
        assert row["easy_negative_loss_share"] == pytest.approx(sum(easy) / total, rel=1e-9)
        confident = losses[~positive & (probability < 0.01)]
        assert 0 < len(confident) < len(negatives)
        assert row["confident_negative_loss_share"] == pytest.approx(confident.sum() / total, rel=1e-9)
        effective = [l[gamma][~p].sum() / l[gamma][~p].max() for p, l, _ in per_image]
        assert row["effective_negatives_per_image"] == pytest.approx(np.mean(effective), rel=1e-9)
        assert row["effective_negatives_per_positive"] == pytest.approx(np.mean(effective) / num_positive.mean())
        for key, group in (("hardest_negatives_for_half_loss", negatives),
                           ("hardest_positives_for_half_loss", sorted(losses[positive]))):
            hardest_first = group[::-1]
            count = next(k for k in range(1, len(group) + 1) if sum(hardest_first[:k]) >= 0.5 * sum(group))
            assert row[key] == pytest.approx(count / len(group))
    # Focusing moves the negatives' share of the loss down, at every step of gamma.
    shares = [row["negative_loss_share"] for row in summary["per_gamma"]]
    assert shares == sorted(shares, reverse=True)


def test_cumulative_loss_and_hardest_fraction_on_hand_computed_values():
    x, y = cumulative_loss(np.array([4.0, 1.0, 3.0, 2.0]), num_points=5)
    np.testing.assert_allclose(x, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(y, [0, 0.1, 0.3, 0.6, 1.0])
    _, y = cumulative_loss(np.array([1.0, 1.0, 1.0]), num_points=4)  # floor(x K): 0, 1, 2, 3 samples
    np.testing.assert_allclose(y, [0, 1 / 3, 2 / 3, 1])
    assert hardest_fraction(np.array([1.0, 1.0, 1.0, 7.0])) == 0.25
    assert hardest_fraction(np.array([1.0, 1.0, 1.0, 1.0])) == 0.5
    assert hardest_fraction(np.array([])) is None and hardest_fraction(np.zeros(3)) is None
    np.testing.assert_array_equal(cumulative_loss(np.zeros(3), num_points=3)[1], np.zeros(3))


def test_gradient_histograms_count_every_anchor_once_in_bins_shared_by_ce_and_fl(model, batch):
    result = collect_anchor_losses(model, [batch], alpha=ALPHA)
    histograms = gradient_histograms(result, num_bins=7)
    norms = result.gradient_norms
    assert result.gradient_gammas == (0.0, 2.0) and norms.shape == (2, len(result.positive))
    assert histograms["linear"][0] == 0 and histograms["linear"][-1] == pytest.approx(norms.max())
    for gamma, row in zip(result.gradient_gammas, norms):
        edges = histograms["linear"]
        expected = [int(((row >= low) & ((row < high) if i < 6 else (row <= high))).sum())
                    for i, (low, high) in enumerate(itertools.pairwise(edges))]
        assert histograms["counts"]["linear"][gamma].tolist() == expected
        assert histograms["counts"]["log"][gamma].sum() + histograms["zero"][gamma] == len(row)


def test_write_analysis_writes_figures_csv_and_json_and_refuses_to_overwrite(model, batch, tmp_path):
    result = collect_anchor_losses(model, [batch], alpha=ALPHA)
    summary = summarize(result)
    paths = write_analysis(result, summary, tmp_path / "out", run_gamma=2.0, metadata={"checkpoint": "x.pth"})
    assert sorted(path.name for path in paths) == sorted(OUTPUT_NAMES)
    stored = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert stored["checkpoint"] == "x.pth" and stored["per_gamma"] == summary["per_gamma"]
    assert stored["sentences"] == summary_sentences(summary)
    with open(tmp_path / "out" / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["gamma"]) for row in rows] == list(GAMMAS)
    assert float(rows[0]["negative_loss_share"]) == summary["per_gamma"][0]["negative_loss_share"]
    with open(tmp_path / "out" / "cumulative_loss.csv", newline="") as handle:
        curves = list(csv.DictReader(handle))
    _, y = cumulative_loss(result.losses[3][~result.positive])
    np.testing.assert_allclose([float(row["negatives_gamma_2"]) for row in curves], y)
    assert (tmp_path / "out" / "cumulative_loss.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="already holds an analysis.*--overwrite"):
        write_analysis(result, summary, tmp_path / "out")
    write_analysis(result, summary, tmp_path / "out", overwrite=True)
    assert check_outputs(tmp_path / "elsewhere", overwrite=False) == tmp_path / "elsewhere"
    assert not (tmp_path / "elsewhere").exists()


def test_the_table_and_sentences_read_the_numbers(model, batch):
    summary = summarize(collect_anchor_losses(model, [batch], alpha=ALPHA))
    table, sentences = format_table(summary), summary_sentences(summary)
    low, high = summary["per_gamma"][0], summary["per_gamma"][3]
    assert f"{100 * low['negative_loss_share']:.3g}%" in table and f"{100 * high['negative_loss_share']:.3g}%" in table
    assert f"{100 * low['confident_negative_loss_share']:.3g}%" in sentences[1]
    assert f"{100 * high['confident_negative_loss_share']:.3g}%" in sentences[1]
    assert len(sentences) == 5


# ---------------------------------------------------------------------------------------------
# The command


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_cli_refuses_a_missing_checkpoint_and_images_0_in_one_line(tmp_path, capsys):
    assert cli_main(["analyze", str(tmp_path / "none.pth")]) == 2
    assert "does not exist" in _one_error_line(capsys)
    assert not (tmp_path / "analysis").exists()
    assert cli_main(["analyze", str(tmp_path / "none.pth"), "--images", "0"]) == 2
    assert "--images must be at least 1, got 0" in _one_error_line(capsys)


def test_cli_refuses_a_folder_holding_an_analysis_before_loading_the_model(tmp_path, capsys):
    checkpoint = tmp_path / "best.pth"
    torch.save({"not": "a model"}, checkpoint)
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "summary.json").write_text("{}")
    assert cli_main(["analyze", str(checkpoint)]) == 2
    assert "already holds an analysis (summary.json); pass --overwrite" in _one_error_line(capsys)
    assert (tmp_path / "analysis" / "summary.json").read_text() == "{}"


@pytest.mark.slow
def test_cli_analyzes_a_trained_checkpoint_end_to_end(tmp_path, tiny, one_thread, capsys):
    detfocal.train(DEMO, tmp_path / "run", overrides=[*tiny, "train.max_iters=2"])
    checkpoint = tmp_path / "run" / "best.pth"
    capsys.readouterr()
    assert cli_main(["analyze", str(checkpoint), "--images", "3"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "run" / "analysis"
    assert sorted(path.name for path in folder.iterdir()) == sorted(OUTPUT_NAMES)
    summary = json.loads((folder / "summary.json").read_text())
    # The demo's anchors (3 sizes, 1 ratio) on 64 px images: 8x8, 4x4, 2x2, 1x1 and 1x1 locations.
    assert summary["images"] == 3 and summary["anchors_per_image"] == 3 * (64 + 16 + 4 + 1 + 1)
    assert summary["alpha"] == 0.25 and summary["run_gamma"] == 2.0 and summary["split"] == "val"
    assert summary["checkpoint"] == str(checkpoint)
    assert "negatives:positive" in out and "At gamma = 0, negatives carry" in out and str(folder) in out

    assert cli_main(["analyze", str(checkpoint)]) == 2  # the folder holds outputs
    assert "--overwrite" in _one_error_line(capsys)
    # More images than the split holds (4): all of them; --set changes the model's input size.
    other = tmp_path / "other"
    assert cli_main(["analyze", str(checkpoint), "--images", "10", "--split", "train", "--out", str(other),
                     "--set", "model.min_size=128", "model.max_size=128"]) == 0
    summary = json.loads((other / "summary.json").read_text())
    assert summary["images"] == 8 and summary["anchors_per_image"] == 3 * (256 + 64 + 16 + 4 + 1)
    assert cli_main(["analyze", str(checkpoint), "--images", "2", "--out", str(other), "--overwrite"]) == 0
    assert json.loads((other / "summary.json").read_text())["images"] == 2
