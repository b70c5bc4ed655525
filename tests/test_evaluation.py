"""detfocal.evaluation.coco against pycocotools and cocoapi's published numbers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detfocal.evaluation import coco as evaluation
from detfocal.evaluation.coco import STAT_NAMES, CocoEvaluator, evaluate_results
from detfocal.evaluation.plots import write_plots

DATA = Path(__file__).resolve().parent / "data"
GT = DATA / "instances_val2014_100.json"
FAKE = DATA / "instances_val2014_fakebbox100_results.json"
# cocoapi's published bbox numbers for its fake results on these 100 images.
COCOAPI = {"AP": 0.50458, "AP50": 0.69697, "AP75": 0.57298, "APs": 0.58563, "APm": 0.51940, "APl": 0.50140,
           "AR1": 0.38681, "AR10": 0.59368, "AR100": 0.59535, "ARs": 0.63981, "ARm": 0.56642, "ARl": 0.56429}


@pytest.fixture(scope="module")
def coco_gt():
    coco = COCO()
    coco.dataset = json.loads(GT.read_text())
    coco.createIndex()
    return coco


@pytest.fixture
def tiny_gt():
    """Two images, categories {3, 7, 90}; every area range has ground truth."""
    return {
        "images": [{"id": 1, "file_name": "1.png", "width": 128, "height": 128},
                   {"id": 2, "file_name": "2.png", "width": 64, "height": 64}],
        "categories": [{"id": 3, "name": "car"}, {"id": 7, "name": "train"}, {"id": 90, "name": "toothbrush"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 90, "bbox": [0, 0, 110, 100], "area": 11000, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 7, "bbox": [0, 0, 40, 30], "area": 1200, "iscrowd": 0},
        ],
    }


def _xyxy(bbox):
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def _predictions_from(detections, label_of):
    """COCO-style detections -> the evaluator's {image_id: {boxes xyxy, scores, labels}}."""
    predictions = {}
    for det in detections:
        entry = predictions.setdefault(det["image_id"], {"boxes": [], "scores": [], "labels": []})
        entry["boxes"].append(_xyxy(det["bbox"]))
        entry["scores"].append(det["score"])
        entry["labels"].append(label_of[det["category_id"]])
    return {image_id: {"boxes": torch.tensor(p["boxes"], dtype=torch.float64).reshape(-1, 4),
                       "scores": torch.tensor(p["scores"]), "labels": torch.tensor(p["labels"])}
            for image_id, p in predictions.items()}


def test_evaluate_results_reproduces_cocoapi_numbers():
    summary = evaluate_results(GT, FAKE)
    assert {name: summary[name] for name in STAT_NAMES} == pytest.approx(COCOAPI, abs=1e-4)


def test_update_with_contiguous_labels_reproduces_cocoapi_numbers(coco_gt):
    label_to_category_id = sorted(coco_gt.getCatIds())  # 80 ids with gaps, 1..90
    evaluator = CocoEvaluator(coco_gt, label_to_category_id)
    label_of = {category_id: label for label, category_id in enumerate(label_to_category_id)}
    evaluator.update(_predictions_from(json.loads(FAKE.read_text()), label_of))
    summary = evaluator.summarize()
    assert {name: summary[name] for name in STAT_NAMES} == pytest.approx(COCOAPI, abs=1e-4)


def test_perfect_predictions_give_ap_one(coco_gt):
    label_to_category_id = sorted(coco_gt.getCatIds())
    label_of = {category_id: label for label, category_id in enumerate(label_to_category_id)}
    truth = [{**ann, "score": 1.0} for ann in coco_gt.dataset["annotations"] if not ann["iscrowd"]]
    evaluator = CocoEvaluator(GT, label_to_category_id)
    evaluator.update(_predictions_from(truth, label_of))
    summary = evaluator.summarize()
    assert summary["AP"] == pytest.approx(1.0) and summary["AP50"] == pytest.approx(1.0)
    assert summary["AR100"] == pytest.approx(1.0)


def test_no_predictions_give_zero_without_error(tiny_gt):
    summary = CocoEvaluator(tiny_gt, [3, 7, 90]).summarize()
    assert all(summary[name] == 0.0 for name in STAT_NAMES)
    assert summary["per_class"] == {"car": 0.0, "train": 0.0, "toothbrush": 0.0}


def test_update_maps_contiguous_labels_to_category_ids_and_xyxy_to_xywh(tiny_gt):
    evaluator = CocoEvaluator(tiny_gt, [3, 7, 90])
    evaluator.update({torch.tensor(1): {"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]), "scores": torch.tensor([0.5]),
                                        "labels": torch.tensor([2])}})
    assert evaluator.results() == [{"image_id": 1, "category_id": 90, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}]


def test_per_class_ap_equals_pycocotools_restricted_to_that_class(coco_gt):
    summary = evaluate_results(coco_gt, FAKE)
    for category_id in (1, 18, 62):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(str(FAKE)), "bbox")
        coco_eval.params.catIds = [category_id]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        assert summary["per_class"][coco_gt.cats[category_id]["name"]] == pytest.approx(coco_eval.stats[0], abs=1e-12)


def test_img_ids_restricts_the_evaluated_images(tiny_gt):
    perfect_image_1 = {1: {"boxes": torch.tensor([[2.0, 2, 22, 22], [0, 0, 110, 100]]), "scores": torch.tensor([0.9, 0.8]),
                           "labels": torch.tensor([0, 2])}}
    everything = CocoEvaluator(tiny_gt, [3, 7, 90])
    everything.update(perfect_image_1)
    restricted = CocoEvaluator(tiny_gt, [3, 7, 90], img_ids=[1])
    restricted.update(perfect_image_1)
    # AR averages over classes: car and toothbrush are found, train (only in image 2) is missed.
    assert everything.summarize()["AR100"] == pytest.approx(2 / 3)
    assert restricted.summarize()["AP"] == pytest.approx(1.0)


def test_write_results_writes_a_results_file_that_evaluates_the_same(tiny_gt, tmp_path):
    evaluator = CocoEvaluator(tiny_gt, [3, 7, 90])
    evaluator.update({2: {"boxes": torch.tensor([[10.0, 10, 60, 60], [0, 0, 30, 30]]), "scores": torch.tensor([0.9, 0.4]),
                          "labels": torch.tensor([1, 1])}})
    path = evaluator.write_results(tmp_path / "out" / "results.json")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["results.json"]  # no temp file left
    assert evaluate_results(tiny_gt, path) == evaluator.summarize()


def test_synchronize_gathers_all_ranks_and_counts_padded_repeats_once(tiny_gt, monkeypatch):
    """Simulates two DDP ranks; rank 1 also saw image 1 (DistributedSampler padding)."""
    box = {"boxes": torch.tensor([[2.0, 2, 22, 22]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}
    other = CocoEvaluator(tiny_gt, [3, 7, 90])
    other.update({1: box, 2: {"boxes": torch.tensor([[10.0, 10, 60, 60]]), "scores": torch.tensor([0.8]),
                              "labels": torch.tensor([1])}})
    monkeypatch.setattr(evaluation.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(evaluation.dist, "get_world_size", lambda: 2)

    def all_gather_object(output, obj):
        output[:] = [obj, other._local]

    monkeypatch.setattr(evaluation.dist, "all_gather_object", all_gather_object)
    evaluator = CocoEvaluator(tiny_gt, [3, 7, 90])
    evaluator.update({1: box})
    evaluator.synchronize()
    assert [(r["image_id"], r["category_id"]) for r in evaluator.results()] == [(1, 3), (2, 7)]


def test_summarize_prints_the_table_only_when_verbose(tiny_gt, capsys):
    evaluator = CocoEvaluator(tiny_gt, [3, 7, 90])
    evaluator.summarize()
    assert capsys.readouterr().out == ""
    evaluator.summarize(verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_write_plots_writes_two_pngs(tiny_gt, tmp_path):
    evaluator = CocoEvaluator(tiny_gt, [3, 7, 90])
    evaluator.update({1: {"boxes": torch.tensor([[2.0, 2, 22, 22]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}})
    paths = write_plots(evaluator, tmp_path / "plots")
    assert [p.name for p in paths] == ["per_class_ap.png", "pr_curves.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda gt: CocoEvaluator(gt, [3, 7, 91]), r"label_to_category_id.*\[91\]"),
        (lambda gt: CocoEvaluator(gt, [3, 7, 90], img_ids=[5]), r"img_ids.*\[5\]"),
        (lambda gt: CocoEvaluator(gt, [3, 7, 90]).update({9: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                                               "labels": torch.zeros(0)}}), "image id 9"),
        (lambda gt: CocoEvaluator(gt, [3, 7, 90]).update({1: {"boxes": torch.zeros(1, 4), "scores": torch.ones(1),
                                                               "labels": torch.tensor([3])}}), r"labels must be in \[0, 3\)"),
        (lambda gt: evaluate_results(gt, [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5], "score": 1.0}]),
         "category ids \\[2\\] are not in the ground truth"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_problem(tiny_gt, build, message):
    with pytest.raises(ValueError, match=message):
        build(tiny_gt)


def test_missing_results_file_raises_file_not_found(tiny_gt, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        evaluate_results(tiny_gt, tmp_path / "missing.json")

