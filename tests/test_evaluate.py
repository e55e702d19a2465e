"""COCO scoring: known answers, per-class numbers, and faster-coco-eval matching pycocotools."""

from __future__ import annotations

import random

import pytest

from stages.evaluate import METRICS, coco_evaluate, prediction_grid


def ground_truth(images: int = 30, seed: int = 0) -> dict:
    rng = random.Random(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}]}
    for image_id in range(1, images + 1):
        gt["images"].append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 320, "height": 240})
        for _ in range(rng.randint(1, 4)):
            w, h = rng.uniform(20, 120), rng.uniform(20, 100)
            box = [rng.uniform(0, 320 - w), rng.uniform(0, 240 - h), w, h]
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": rng.choice([1, 2]),
                    "bbox": box,
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    return gt


def test_perfect_detections_score_one() -> None:
    gt = ground_truth()
    detections = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]
    ]
    result = coco_evaluate(gt, detections, "pycocotools")
    assert result["overall"]["AP"] == pytest.approx(1.0) and result["overall"]["AP50"] == pytest.approx(1.0)
    assert result["per_class"]["car"] == {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0)}
    assert len(result["pr"]["bus"]) == 101 and result["pr"]["bus"][-1] == {"recall": 1.0, "precision": pytest.approx(1.0)}


def test_wrong_class_scores_zero_for_that_class_and_no_detections_is_zero() -> None:
    gt = ground_truth()
    detections = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9 if a["category_id"] == 1 else 0.5}
        for a in gt["annotations"]
    ]  # buses called cars, ranked below the real cars
    result = coco_evaluate(gt, detections, "pycocotools")
    assert result["per_class"]["bus"]["AP"] == 0.0 and result["per_class"]["car"]["AP"] == pytest.approx(1.0)
    empty = coco_evaluate(gt, [], "pycocotools")
    assert set(empty["overall"]) == set(METRICS) and not any(empty["overall"].values())


def test_faster_coco_eval_gives_pycocotools_numbers() -> None:
    gt = ground_truth(60, seed=3)
    rng = random.Random(1)
    detections = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        detections.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"] if rng.random() < 0.8 else 3 - ann["category_id"],
                "bbox": [x + rng.gauss(0, 6), y + rng.gauss(0, 6), w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)],
                "score": rng.random(),
            }
        )
    reference = coco_evaluate(gt, detections, "pycocotools")
    fast = coco_evaluate(gt, detections, "faster_coco_eval")
    assert 0.1 < reference["overall"]["AP"] < 0.9  # a non-trivial case
    assert fast["overall"] == pytest.approx(reference["overall"], abs=1e-12)
    for name, values in reference["per_class"].items():
        assert fast["per_class"][name] == pytest.approx(values, abs=1e-12)


def test_prediction_grid_draws_each_image(tmp_path) -> None:
    from PIL import Image

    gt = ground_truth(5)
    for image in gt["images"]:
        Image.new("RGB", (320, 240), (90, 90, 90)).save(tmp_path / image["file_name"])
    detections = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 40], "score": 0.8}]
    grid = prediction_grid(gt, detections, tmp_path)
    assert grid.size == (4 * 320, 2 * 240)
    assert grid.getpixel((10, 30)) == (255, 0, 0)  # the prediction's left edge, in red
