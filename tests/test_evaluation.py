"""detfocal.evaluation.coco against pycocotools and cocoapi's published numbers, for both backends."""
from __future__ import annotations

import csv
import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detfocal.evaluation import coco as evaluation
from detfocal.evaluation.coco import (PER_CLASS_COLUMNS, STAT_NAMES, CocoEvaluator, evaluate_results, resolve_backend,
                                      write_per_class_csv)
from detfocal.evaluation.plots import figure_pr_curves, write_plots

DATA = Path(__file__).resolve().parent / "data"
GT = DATA / "instances_val2014_100.json"
FAKE = DATA / "instances_val2014_fakebbox100_results.json"
# cocoapi's published bbox numbers for its fake results on these 100 images.
COCOAPI = {"AP": 0.50458, "AP50": 0.69697, "AP75": 0.57298, "APs": 0.58563, "APm": 0.51940, "APl": 0.50140,
           "AR1": 0.38681, "AR10": 0.59368, "AR100": 0.59535, "ARs": 0.63981, "ARm": 0.56642, "ARl": 0.56429}
HAS_FASTER = importlib.util.find_spec("faster_coco_eval") is not None
BACKENDS = ["pycocotools", pytest.param("faster_coco_eval", marks=pytest.mark.skipif(
    not HAS_FASTER, reason="faster-coco-eval is not installed"))]
needs_faster = pytest.mark.skipif(not HAS_FASTER, reason="faster-coco-eval is not installed")


@pytest.fixture(scope="module")
def coco_gt():
    coco = COCO()
    coco.dataset = json.loads(GT.read_text())
    coco.createIndex()
    return coco


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def fake_evaluators(coco_gt):
    """{backend: CocoEvaluator summarized on cocoapi's fake results, fed as contiguous labels}."""
    label_to_category_id = sorted(coco_gt.getCatIds())  # 80 ids with gaps, 1..90
    label_of = {category_id: label for label, category_id in enumerate(label_to_category_id)}
    predictions = _predictions_from(json.loads(FAKE.read_text()), label_of)
    evaluators = {}
    for backend in ("pycocotools", "faster_coco_eval") if HAS_FASTER else ("pycocotools",):
        evaluators[backend] = CocoEvaluator(coco_gt, label_to_category_id, backend=backend)
        evaluators[backend].update(predictions)
        evaluators[backend].summarize()
    return evaluators


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


def _predictions_from(detections, label_of, device="cpu"):
    """COCO-style detections -> the evaluator's {image_id: {boxes xyxy, scores, labels}}, tensors on ``device``."""
    predictions = {}
    for det in detections:
        entry = predictions.setdefault(det["image_id"], {"boxes": [], "scores": [], "labels": []})
        entry["boxes"].append(_xyxy(det["bbox"]))
        entry["scores"].append(det["score"])
        entry["labels"].append(label_of[det["category_id"]])
    return {image_id: {"boxes": torch.tensor(p["boxes"], dtype=torch.float64, device=device).reshape(-1, 4),
                       "scores": torch.tensor(p["scores"], device=device),
                       "labels": torch.tensor(p["labels"], device=device)}
            for image_id, p in predictions.items()}


def _random_gt_and_predictions(seed: int = 0, num_images: int = 12):
    """A shapes-like ground truth (5 classes with ids that have gaps, 128 px images, every area
    range, one crowd box) and seeded model-like predictions: jittered true boxes, wrong labels,
    false positives, scores rounded to 0.1 so that many tie, and one image over the 100 cap."""
    rng = np.random.default_rng(seed)
    category_ids = [2, 5, 9, 11, 20]
    names = ["circle", "square", "triangle", "star", "ring"]
    gt = {"images": [], "annotations": [],
          "categories": [{"id": i, "name": name} for i, name in zip(category_ids, names)]}
    predictions = {}
    for image_id in range(1, num_images + 1):
        gt["images"].append({"id": image_id, "file_name": f"{image_id}.png", "width": 128, "height": 128})
        boxes, scores, labels = [], [], []
        for _ in range(rng.integers(1, 6)):
            w, h = rng.uniform(6, 110, size=2).tolist()
            x, y = float(rng.uniform(0, 128 - w)), float(rng.uniform(0, 128 - h))
            label = int(rng.integers(5))
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "bbox": [x, y, w, h],
                                      "category_id": category_ids[label], "area": w * h,
                                      "iscrowd": int(image_id == 3 and not boxes)})
            if rng.random() < 0.85:
                jitter = rng.normal(0, 0.1, size=4) * [w, h, w, h]
                boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
                scores.append(round(float(rng.uniform(0.1, 1.0)), 1))
                labels.append(label if rng.random() < 0.8 else int(rng.integers(5)))
        for _ in range(150 if image_id == 5 else rng.integers(0, 6)):
            x, y = rng.uniform(0, 100, size=2)
            boxes.append([x, y, x + rng.uniform(4, 28), y + rng.uniform(4, 28)])
            scores.append(round(float(rng.uniform(0.0, 0.6)), 1))
            labels.append(int(rng.integers(5)))
        predictions[image_id] = {"boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                                 "scores": torch.tensor(scores, dtype=torch.float64),
                                 "labels": torch.tensor(labels, dtype=torch.int64)}
    return gt, category_ids, predictions


def _assert_same_evaluation(first: CocoEvaluator, second: CocoEvaluator) -> None:
    """Same 12 stats, per-class AP, precision and recall arrays, to 1e-9."""
    a, b = first.summary or first.summarize(), second.summary or second.summarize()
    assert [a[name] for name in STAT_NAMES] == pytest.approx([b[name] for name in STAT_NAMES], abs=1e-9, rel=0)
    assert list(a["per_class"]) == list(b["per_class"])
    assert list(a["per_class"].values()) == pytest.approx(list(b["per_class"].values()), abs=1e-9, rel=0)
    for key in ("precision", "recall"):
        np.testing.assert_allclose(first.coco_eval.eval[key], second.coco_eval.eval[key], rtol=0, atol=1e-9)


def test_evaluate_results_reproduces_cocoapi_numbers(backend):
    summary = evaluate_results(GT, FAKE, backend=backend)
    assert {name: summary[name] for name in STAT_NAMES} == pytest.approx(COCOAPI, abs=1e-4)


def test_update_with_contiguous_labels_reproduces_cocoapi_numbers(fake_evaluators, backend):
    summary = fake_evaluators[backend].summary
    assert fake_evaluators[backend].backend == backend
    assert {name: summary[name] for name in STAT_NAMES} == pytest.approx(COCOAPI, abs=1e-4)


@needs_faster
def test_backends_agree_to_1e9_on_the_real_sample(fake_evaluators):
    _assert_same_evaluation(fake_evaluators["pycocotools"], fake_evaluators["faster_coco_eval"])


@needs_faster
@pytest.mark.parametrize("seed", [0, 1])
def test_backends_agree_to_1e9_on_seeded_model_like_detections(seed):
    gt, category_ids, predictions = _random_gt_and_predictions(seed)
    evaluators = [CocoEvaluator(gt, category_ids, backend=backend) for backend in ("pycocotools", "faster_coco_eval")]
    for evaluator in evaluators:
        evaluator.update(predictions)
    _assert_same_evaluation(*evaluators)
    assert 0.05 < evaluators[0].summary["AP"] < 0.95  # neither trivial nor perfect


@needs_faster
def test_auto_backend_is_faster_coco_eval_when_installed(tiny_gt):
    assert CocoEvaluator(tiny_gt, [3, 7, 90]).backend == "faster_coco_eval"


def test_auto_backend_falls_back_to_pycocotools_with_a_warning(tiny_gt, monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import raises ImportError
    with pytest.warns(UserWarning, match="pycocotools"):
        evaluator = CocoEvaluator(tiny_gt, [3, 7, 90])
    assert evaluator.backend == "pycocotools"
    assert evaluator.summarize()["AP"] == 0.0


def test_requested_faster_coco_eval_missing_says_how_to_install(tiny_gt, monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)
    with pytest.raises(ValueError, match="eval.backend.*pip install faster-coco-eval"):
        CocoEvaluator(tiny_gt, [3, 7, 90], backend="faster_coco_eval")


def test_unknown_backend_raises_naming_the_key_value_and_choices(tiny_gt):
    with pytest.raises(ValueError, match=r"eval\.backend.*'cocoapi'.*auto, pycocotools, faster_coco_eval"):
        CocoEvaluator(tiny_gt, [3, 7, 90], backend="cocoapi")
    with pytest.raises(ValueError, match=r"eval\.backend.*'cocoapi'"):
        evaluate_results(tiny_gt, [], backend="cocoapi")
    assert resolve_backend("pycocotools") == "pycocotools"


def test_per_class_csv_matches_pycocotools_precision_array_and_gt_counts(fake_evaluators, backend, tmp_path):
    path = write_per_class_csv(fake_evaluators[backend], tmp_path / "per_class.csv")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == PER_CLASS_COLUMNS
    gt = json.loads(GT.read_text())
    detections = json.loads(FAKE.read_text())
    reference = COCOeval(COCO(str(GT)), COCO(str(GT)).loadRes(str(FAKE)), "bbox")
    reference.evaluate()
    reference.accumulate()
    precision = reference.eval["precision"][:, :, :, 0, -1]  # (T, R, K) at area all, 100 detections
    assert [row["class"] for row in rows] == [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    assert len(rows) == 80 and reference.params.catIds == sorted(c["id"] for c in gt["categories"])
    for k, (row, category_id) in enumerate(zip(rows, reference.params.catIds)):
        num_gt = sum(1 for a in gt["annotations"] if a["category_id"] == category_id and not a["iscrowd"])
        assert int(row["num_gt"]) == num_gt
        assert int(row["num_detections"]) == sum(1 for d in detections if d["category_id"] == category_id)
        for name, values in (("AP", precision[:, :, k]), ("AP50", precision[0, :, k]), ("AP75", precision[5, :, k])):
            if (values > -1).any():
                assert float(row[name]) == pytest.approx(values[values > -1].mean(), abs=5.01e-5)
            else:
                assert row[name] == "" and num_gt == 0


def test_per_class_csv_counts_only_the_evaluated_images_and_no_crowd(tiny_gt, tmp_path):
    tiny_gt["annotations"].append({"id": 5, "image_id": 1, "category_id": 7, "bbox": [0, 0, 9, 9], "area": 81,
                                   "iscrowd": 1})
    evaluator = CocoEvaluator(tiny_gt, [3, 7, 90], img_ids=[1])
    evaluator.update({
        1: {"boxes": torch.tensor([[2.0, 2, 22, 22]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])},
        2: {"boxes": torch.tensor([[10.0, 10, 60, 60]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}})
    rows = list(csv.DictReader(write_per_class_csv(evaluator, tmp_path / "per_class.csv").open(encoding="utf-8")))
    assert [(r["class"], r["AP"], r["num_gt"], r["num_detections"]) for r in rows] == [
        ("car", "1.0000", "1", "1"), ("train", "", "0", "0"), ("toothbrush", "0.0000", "1", "0")]


def test_perfect_predictions_give_ap_one(coco_gt, backend, device):
    label_to_category_id = sorted(coco_gt.getCatIds())
    label_of = {category_id: label for label, category_id in enumerate(label_to_category_id)}
    truth = [{**ann, "score": 1.0} for ann in coco_gt.dataset["annotations"] if not ann["iscrowd"]]
    evaluator = CocoEvaluator(GT, label_to_category_id, backend=backend)
    evaluator.update(_predictions_from(truth, label_of, device))
    summary = evaluator.summarize()
    assert summary["AP"] == pytest.approx(1.0) and summary["AP50"] == pytest.approx(1.0)
    assert summary["AR100"] == pytest.approx(1.0)


def test_no_predictions_give_zero_without_error(tiny_gt, backend):
    summary = CocoEvaluator(tiny_gt, [3, 7, 90], backend=backend).summarize()
    assert all(summary[name] == 0.0 for name in STAT_NAMES)
    assert summary["per_class"] == {"car": 0.0, "train": 0.0, "toothbrush": 0.0}


def test_update_maps_contiguous_labels_to_category_ids_and_xyxy_to_xywh(tiny_gt, device):
    evaluator = CocoEvaluator(tiny_gt, [3, 7, 90])
    # A model's output on its device: fp16 boxes and scores, as under autocast, are read as their values.
    evaluator.update({torch.tensor(1): {"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]], device=device).half(),
                                        "scores": torch.tensor([0.5], device=device).half(),
                                        "labels": torch.tensor([2], device=device)}})
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


def test_img_ids_restricts_the_evaluated_images(tiny_gt, backend):
    perfect_image_1 = {1: {"boxes": torch.tensor([[2.0, 2, 22, 22], [0, 0, 110, 100]]), "scores": torch.tensor([0.9, 0.8]),
                           "labels": torch.tensor([0, 2])}}
    everything = CocoEvaluator(tiny_gt, [3, 7, 90], backend=backend)
    everything.update(perfect_image_1)
    restricted = CocoEvaluator(tiny_gt, [3, 7, 90], img_ids=[1], backend=backend)
    restricted.update(perfect_image_1)
    # AR averages over classes: car and toothbrush are found, train (only in image 2) is missed.
    assert everything.summarize()["AR100"] == pytest.approx(2 / 3)
    assert restricted.summarize()["AP"] == pytest.approx(1.0)


def test_write_results_writes_a_results_file_that_evaluates_the_same(tiny_gt, tmp_path, backend):
    evaluator = CocoEvaluator(tiny_gt, [3, 7, 90], backend=backend)
    evaluator.update({2: {"boxes": torch.tensor([[10.0, 10, 60, 60], [0, 0, 30, 30]]), "scores": torch.tensor([0.9, 0.4]),
                          "labels": torch.tensor([1, 1])}})
    path = evaluator.write_results(tmp_path / "out" / "results.json")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["results.json"]  # no temp file left
    assert evaluate_results(tiny_gt, path, backend=backend) == evaluator.summarize()


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


def test_summarize_logs_the_table_only_when_verbose_and_prints_nothing(tiny_gt, capsys, caplog, backend):
    caplog.set_level(logging.INFO, logger="detfocal")
    evaluator = CocoEvaluator(tiny_gt, [3, 7, 90], backend=backend)
    evaluator.summarize()
    assert capsys.readouterr() == ("", "") and not caplog.records
    evaluator.summarize(verbose=True)
    assert capsys.readouterr() == ("", "")
    (record,) = caplog.records
    assert record.name == "detfocal.evaluation.coco" and record.levelno == logging.INFO
    table = record.getMessage().splitlines()
    # pycocotools' 12 stats; faster-coco-eval adds AR at IoU 0.5 and 0.75.
    assert len(table) == (12 if backend == "pycocotools" else 14)
    assert all("Average Precision" in line for line in table[:6])
    assert all("Average Recall" in line for line in table[6:])


def test_write_plots_writes_two_pngs_and_the_per_class_csv(tiny_gt, tmp_path, backend):
    evaluator = CocoEvaluator(tiny_gt, [3, 7, 90], backend=backend)
    evaluator.update({1: {"boxes": torch.tensor([[2.0, 2, 22, 22]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}})
    paths = write_plots(evaluator, tmp_path / "plots")
    assert [p.name for p in paths] == ["per_class_ap.png", "pr_curves.png", "per_class.csv"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)  # no temporaries
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths[:2])
    assert paths[2].read_text().splitlines()[0] == ",".join(PER_CLASS_COLUMNS)


def _legend(figure):
    (legend,) = figure.legends
    return legend.get_title().get_text(), [text.get_text() for text in legend.get_texts()]


def test_pr_curves_label_every_class_up_to_20_with_its_ap50_and_ap75():
    gt, category_ids, predictions = _random_gt_and_predictions()
    evaluator = CocoEvaluator(gt, category_ids)
    evaluator.update(predictions)
    rows = evaluation.per_class_table(evaluator)
    _, labels = _legend(figure_pr_curves(evaluator))
    best_first = sorted((row for row in rows if row["AP"] >= 0), key=lambda row: -row["AP"])
    assert labels == [f"{row['class']}: {row['AP50']:.3f} / {row['AP75']:.3f}" for row in best_first]
    assert len(labels) == 5


def test_pr_curves_of_80_classes_label_only_the_best_and_worst_five(fake_evaluators):
    evaluator = next(iter(fake_evaluators.values()))
    title, labels = _legend(figure_pr_curves(evaluator))
    per_class = evaluator.summary["per_class"]
    ranked = sorted((name for name, ap in per_class.items() if ap >= 0), key=lambda name: -per_class[name])
    assert "worst (right) 5 of 70 classes" in title and len(labels) == 10
    assert [label.split(":")[0] for label in labels] == ranked[:5] + ranked[-5:]


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
        (lambda gt: CocoEvaluator([gt], [3, 7, 90]),
         r"^annotation_file: expected a path to a COCO json or a COCO dict, got a list$"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_problem(tiny_gt, build, message):
    with pytest.raises(ValueError, match=message):
        build(tiny_gt)


DETECTION = {"image_id": 1, "category_id": 3, "bbox": [2, 2, 20, 20], "score": 0.9}


@pytest.mark.parametrize("results, expected", [
    ({"1": DETECTION}, "results_json: expected a list of detections or the path of a json holding one, got a dict"),
    ("not a path or list", "results_json: not a path or list does not exist"),
    ([DETECTION, "x"], "results_json: detection 1 is a str ('x'), expected a dict with image_id, category_id, bbox "
                       "and score"),
    ([{**DETECTION, "bbox": "2,2,20,20"}],
     "results_json: detection 0 has bbox '2,2,20,20', expected [x, y, w, h], four finite numbers"),
    ([{**DETECTION, "bbox": [2, 2, 20]}],
     "results_json: detection 0 has bbox [2, 2, 20], expected [x, y, w, h], four finite numbers"),
    ([{**DETECTION, "bbox": [2, 2, float("inf"), 20]}],
     "results_json: detection 0 has bbox [2, 2, inf, 20], expected [x, y, w, h], four finite numbers"),
    ([{**DETECTION, "image_id": "1"}], "results_json: detection 0 has image_id '1', expected an int"),
    ([{**DETECTION, "category_id": 3.0}], "results_json: detection 0 has category_id 3.0, expected an int"),
    ([{**DETECTION, "score": None}], "results_json: detection 0 has score None, expected a finite number"),
    ([{"image_id": 1, "bbox": [0, 0, 1, 1]}], "results_json: detection 0 has no ['category_id', 'score']"),
])
def test_malformed_results_raise_value_error_saying_what_is_wrong(tiny_gt, backend, results, expected):
    error_type = FileNotFoundError if isinstance(results, str) else ValueError
    with pytest.raises(error_type) as error:
        evaluate_results(tiny_gt, results, backend=backend)
    assert str(error.value) == expected


def test_results_with_numpy_numbers_and_tuples_evaluate_as_plain_ones(tiny_gt, backend):
    plain = [DETECTION, {**DETECTION, "image_id": 2, "category_id": 7, "bbox": [10, 10, 50, 50], "score": 0.5}]
    typed = [{"image_id": np.int64(r["image_id"]), "category_id": np.int32(r["category_id"]),
              "bbox": tuple(np.float32(v) for v in r["bbox"]), "score": np.float64(r["score"])} for r in plain]
    assert evaluate_results(tiny_gt, typed, backend=backend) == evaluate_results(tiny_gt, plain, backend=backend)
    assert isinstance(typed[0]["bbox"], tuple)  # the caller's detections are left as they were


def test_results_file_that_is_not_json_raises_one_line_value_error(tiny_gt, tmp_path):
    path = tmp_path / "results.json"
    path.write_text("[{")
    with pytest.raises(ValueError, match=rf"^results_json: {path} is not valid UTF-8 json "
                                         rf"\(JSONDecodeError: [^\n]*\)$"):
        evaluate_results(tiny_gt, path)


@pytest.mark.parametrize("field", ["images", "categories"])
def test_ground_truth_ids_beyond_2_53_are_refused_before_either_backend_sees_them(tiny_gt, backend, field):
    # faster-coco-eval holds ids as doubles: 2**53 + 1 and 2**53 + 2 would be one image, or one class.
    big = 2 ** 53 + 1
    tiny_gt[field][1]["id"] = big
    reference = "image_id" if field == "images" else "category_id"
    for ann in tiny_gt["annotations"]:
        if ann[reference] == (2 if field == "images" else 7):
            ann[reference] = big
    with pytest.raises(ValueError, match=rf"^annotation_file: <annotation dict>: {field}\[1\]\['id'\] is {big}, "
                                         rf"expected an int of magnitude below 2\*\*53"):
        CocoEvaluator(tiny_gt, [3, 7, 90], backend=backend)


def test_missing_results_file_raises_file_not_found(tiny_gt, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        evaluate_results(tiny_gt, tmp_path / "missing.json")

