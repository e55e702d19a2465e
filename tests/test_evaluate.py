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


def test_wrong_class_scores_zero_for_that_class() -> None:
    gt = ground_truth()
    detections = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9 if a["category_id"] == 1 else 0.5}
        for a in gt["annotations"]
    ]  # buses called cars, ranked below the real cars
    result = coco_evaluate(gt, detections, "pycocotools")
    assert result["per_class"]["bus"]["AP"] == 0.0 and result["per_class"]["car"]["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_no_detections_score_as_pycocotools_scores_useless_ones(backend: str) -> None:
    """0 where there is ground truth to miss, -1 where a number is undefined (no small or large object,
    a class with no box), as pycocotools says for a detection that matches nothing."""
    gt = ground_truth(10)
    gt["categories"].append({"id": 3, "name": "truck"})  # no truck in the ground truth
    for ann in gt["annotations"]:  # every object medium-sized: APs and APl undefined
        ann["area"] = 50.0**2
    empty = coco_evaluate(gt, [], backend)
    miss = [{"image_id": 1, "category_id": 1, "bbox": [300.0, 200.0, 10.0, 10.0], "score": 0.01}]
    for box in (a["bbox"] for a in gt["annotations"] if a["image_id"] == 1):
        assert box[0] + box[2] < 300 or box[1] + box[3] < 200  # the miss overlaps nothing
    useless = coco_evaluate(gt, miss, "pycocotools")
    assert empty["overall"] == useless["overall"] and empty["per_class"] == useless["per_class"]
    assert set(empty["overall"]) == set(METRICS)
    assert empty["overall"]["AP"] == 0.0 and empty["overall"]["APs"] == -1 and empty["overall"]["APl"] == -1
    assert empty["per_class"]["truck"] == {"AP": -1.0, "AP50": -1.0} and empty["per_class"]["bus"] == {"AP": 0.0, "AP50": 0.0}


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


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_detections_on_a_crowd_region_are_ignored_not_false_positives(backend: str) -> None:
    """A crowd region stays in the ground truth with iscrowd 1: COCOeval ignores detections matched to it."""
    people = [[20.0, 40.0, 30.0, 80.0], [200.0, 40.0, 30.0, 80.0]]
    crowd = [60.0, 100.0, 120.0, 100.0]  # a group of people annotated as one region
    gt = {
        "images": [{"id": 1, "file_name": "1.jpg", "width": 320, "height": 240}],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [
            *({"id": i, "image_id": 1, "category_id": 1, "bbox": b, "area": 2e3, "iscrowd": 0} for i, b in enumerate(people, 1)),
            {"id": 9, "image_id": 1, "category_id": 1, "bbox": crowd, "area": 7000.0, "iscrowd": 1},
        ],
    }
    detections = [{"image_id": 1, "category_id": 1, "bbox": box, "score": 0.5} for box in people]
    # Three people inside the crowd region, found with more confidence than the annotated ones.
    detections += [
        {"image_id": 1, "category_id": 1, "bbox": [60.0 + 40 * k, 110.0, 30.0, 80.0], "score": 0.9 - 0.1 * k} for k in range(3)
    ]
    result = coco_evaluate(gt, detections, backend)
    assert result["overall"]["AP"] == pytest.approx(1.0)  # the three are neither true nor false positives

    without_crowd = {**gt, "annotations": [ann for ann in gt["annotations"] if not ann["iscrowd"]]}
    dropped = coco_evaluate(without_crowd, detections, backend)  # what dropping crowd regions did
    assert dropped["overall"]["AP"] < 0.5  # the three rank first, as false positives


def test_small_medium_large_follow_the_ground_truth_area() -> None:
    """COCOeval sizes objects by the annotation's area (COCO's segmentation area), not by the box."""
    gt = {
        "images": [{"id": 1, "file_name": "1.jpg", "width": 320, "height": 240}],
        "categories": [{"id": 1, "name": "car"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 900.0, "iscrowd": 0}],
    }
    result = coco_evaluate(gt, [{"image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 40.0, 40.0], "score": 0.9}])
    assert result["overall"]["APs"] == pytest.approx(1.0) and result["overall"]["APm"] == -1  # 900 < 32^2 < 40 x 40


def test_annotation_ids_from_zero_score_like_any_other() -> None:
    """pycocotools reads a matched ground-truth id of 0 as "no match"; own labels.json files may start at 0."""
    gt = ground_truth(10)
    for number, ann in enumerate(gt["annotations"]):
        ann["id"] = number
    detections = [{**{k: a[k] for k in ("image_id", "category_id", "bbox")}, "score": 0.9} for a in gt["annotations"]]
    assert coco_evaluate(gt, detections, "pycocotools")["overall"]["AP"] == pytest.approx(1.0)
