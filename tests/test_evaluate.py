"""COCO scoring: known answers, per-class numbers, and faster-coco-eval matching pycocotools."""

from __future__ import annotations

import random

import numpy as np
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


LIGHTS = [{"id": 1, "name": "traffic_light_red"}, {"id": 2, "name": "traffic_light_green"}, {"id": 3, "name": "car"}]
RED, GREEN, CAR, BACKGROUND = 0, 1, 2, 3  # rows and columns of the matrix


def scene(objects: list[tuple[int, list[float]]], crowd: list[list[float]] = ()) -> dict:
    """One 320 x 240 image holding ``objects`` (category id, box) and crowd regions of cars."""
    annotations = [
        {"id": n, "image_id": 1, "category_id": c, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        for n, (c, box) in enumerate(objects, 1)
    ]
    annotations += [
        {"id": 100 + n, "image_id": 1, "category_id": 3, "bbox": box, "area": box[2] * box[3], "iscrowd": 1}
        for n, box in enumerate(crowd)
    ]
    image = {"id": 1, "file_name": "1.jpg", "width": 320, "height": 240}
    return {"images": [image], "annotations": annotations, "categories": LIGHTS}


def det(category_id: int, box: list[float], score: float = 0.9) -> dict:
    return {"image_id": 1, "category_id": category_id, "bbox": box, "score": score}


def test_confusion_matrix_counts_right_wrong_missed_and_false_alarms() -> None:
    from trafficdet.confusion import confusion_matrix

    gt = scene([(1, [10, 10, 20, 40]), (2, [60, 10, 20, 40]), (3, [100, 150, 80, 40]), (3, [200, 150, 80, 40])])
    detections = [
        det(2, [10, 10, 20, 40]),  # the red light, called green
        det(2, [61, 11, 20, 40]),  # the green light, right (IoU 0.87)
        det(3, [100, 150, 80, 40], score=0.2),  # the first car, below the threshold: missed
        det(3, [200, 150, 80, 40]),  # the second car, right
        det(3, [204, 150, 80, 40], score=0.8),  # a second box on it: a false alarm
        det(1, [280, 10, 20, 40]),  # nothing there: a false alarm
    ]
    matrix = confusion_matrix(gt, detections, score_threshold=0.25, iou_threshold=0.5)
    expected = np.zeros((4, 4), dtype=int)
    expected[GREEN, RED] = 1
    expected[GREEN, GREEN] = 1
    expected[CAR, CAR] = 1
    expected[BACKGROUND, CAR] = 1
    expected[CAR, BACKGROUND] = 1
    expected[RED, BACKGROUND] = 1
    assert matrix.tolist() == expected.tolist()
    assert matrix.sum(axis=0)[:BACKGROUND].tolist() == [1, 1, 2]  # every object counted once, in its column
    assert confusion_matrix(gt, detections, score_threshold=0.2)[CAR, CAR] == 2  # the first car counts at 0.2
    # IoU exactly 0.5 pairs, as COCO's AP50 does
    shifted = confusion_matrix(scene([(3, [0, 0, 60, 40])]), [det(3, [20, 0, 60, 40])], 0.25)  # IoU 40/80 = 0.5
    assert shifted[CAR, CAR] == 1
    assert confusion_matrix(scene([(3, [0, 0, 60, 40])]), [det(3, [21, 0, 60, 40])], 0.25)[CAR, CAR] == 0  # IoU < 0.5


def test_confusion_pairs_highest_iou_first_each_box_once() -> None:
    """Ultralytics' rule: a detection over two objects goes to the one it overlaps most; the other is missed."""
    from trafficdet.confusion import confusion_matrix

    gt = scene([(1, [10, 10, 20, 40]), (2, [14, 10, 20, 40])])  # two lights side by side, overlapping
    matrix = confusion_matrix(gt, [det(2, [13, 10, 20, 40])], 0.25)  # IoU 0.74 with the red, 0.90 with the green
    assert matrix[GREEN, GREEN] == 1 and matrix[BACKGROUND, RED] == 1 and matrix[GREEN, RED] == 0
    both = confusion_matrix(gt, [det(2, [13, 10, 20, 40]), det(1, [10, 10, 20, 40], 0.5)], 0.25)
    assert both[GREEN, GREEN] == 1 and both[RED, RED] == 1 and both[:, BACKGROUND].sum() == 0


def test_confusion_ignores_crowd_regions_as_cocoeval_does() -> None:
    from trafficdet.confusion import confusion_matrix

    gt = scene([(3, [10, 150, 60, 40])], crowd=[[150, 100, 160, 120]])
    detections = [det(3, [10, 150, 60, 40]), det(3, [160, 120, 50, 60]), det(3, [290, 100, 60, 40])]  # in, half out
    matrix = confusion_matrix(gt, detections, 0.25)
    assert matrix[CAR, CAR] == 1  # the crowd region is no object: not missed
    assert matrix[BACKGROUND].sum() == 0
    assert matrix[CAR, BACKGROUND] == 1  # only the box mostly outside the region is a false alarm (20 of 60 px inside)


def test_confusion_record_picture_and_model_card_lines() -> None:
    """The JSON and the picture are the same bytes from the same input; the card states the light confusions."""
    from trafficdet.confusion import confusion_matrix, plot, record
    from trafficdet.model_card import confusions

    gt = scene([(1, [10, 10, 20, 40]), (1, [40, 10, 20, 40]), (2, [60, 10, 20, 40]), (3, [100, 150, 80, 40])])
    detections = [det(2, [10, 10, 20, 40]), det(1, [40, 10, 20, 40]), det(2, [60, 10, 20, 40]), det(3, [250, 150, 60, 40])]
    names = [c["name"] for c in LIGHTS]
    matrix = confusion_matrix(gt, detections, 0.25)
    saved = record(names, matrix, 0.25, 0.5)
    assert saved["labels"] == [*names, "background"] and saved["matrix"] == matrix.tolist()
    picture = plot(names, matrix, 0.25, 0.5, images=1)
    assert picture.startswith(b"\x89PNG") and picture == plot(names, matrix, 0.25, 0.5, images=1)
    lines = confusions(saved)
    assert "| traffic_light_red | 2 | 1 | traffic_light_green 1 | 0 |" in lines
    assert "| car | 1 | 0 | - | 1 |" in lines
    assert "False alarms (a detection where no object is): 1 (car 1)." in lines
    assert "Red lights called green: 1 of 2; green lights called red: 0 of 1." in lines
