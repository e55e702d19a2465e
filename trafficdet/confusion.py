"""The detection confusion matrix, as Ultralytics draws it: which class each object was taken for.

Rows are the predicted class, columns the true one, each with a last ``background`` entry:
the background row counts objects nothing found (missed), the background column detections
that found no object (false alarms). Per image, detections scoring at least the score threshold
and the ground-truth boxes are paired whatever their classes, by IoU >= the IoU threshold,
highest IoU first, each box in at most one pair (Ultralytics' ``ConfusionMatrix.process_batch``
rule; its IoU is > 0.45, ours COCO's >= 0.5). A pair adds 1 at (its detection's class, its
object's class): on the diagonal if right, off it if the class is wrong.

COCO's crowd regions (``iscrowd: 1``) are not objects here either: they take no pair, and a
detection left unpaired that lies mostly inside one (over half its area, COCO's crowd
overlap) is not counted as a false alarm, as COCOeval ignores it.

Written by hand: Ultralytics' class needs torch, which this stack does not install, for
the 20 lines of matching below. Every count is an integer and IoU ties break by box order,
so the matrix is a pure function of its inputs.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

BACKGROUND = "background"


def iou_matrix(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """IoU of every box of ``first`` (N x 4, x y w h) with every box of ``second`` (M x 4): N x M."""
    x0 = np.maximum(first[:, None, 0], second[None, :, 0])
    y0 = np.maximum(first[:, None, 1], second[None, :, 1])
    x1 = np.minimum(first[:, None, 0] + first[:, None, 2], second[None, :, 0] + second[None, :, 2])
    y1 = np.minimum(first[:, None, 1] + first[:, None, 3], second[None, :, 1] + second[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = first[:, None, 2] * first[:, None, 3] + second[None, :, 2] * second[None, :, 3] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def inside_fraction(boxes: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """For each box (N x 4), the largest fraction of its area inside one of ``regions`` (M x 4)."""
    if not len(regions) or not len(boxes):
        return np.zeros(len(boxes))
    x0 = np.maximum(boxes[:, None, 0], regions[None, :, 0])
    y0 = np.maximum(boxes[:, None, 1], regions[None, :, 1])
    x1 = np.minimum(boxes[:, None, 0] + boxes[:, None, 2], regions[None, :, 0] + regions[None, :, 2])
    y1 = np.minimum(boxes[:, None, 1] + boxes[:, None, 3], regions[None, :, 1] + regions[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = boxes[:, 2:3] * boxes[:, 3:4]
    return np.divide(inter, area, out=np.zeros_like(inter), where=area > 0).max(axis=1)


def pairs(ious: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """(object, detection) pairs with IoU >= ``threshold``, highest first, each index used once."""
    objects, detections = np.nonzero(ious >= threshold)
    order = np.lexsort((detections, objects, -ious[objects, detections]))  # ties: lower indices first
    taken_objects: set[int] = set()
    taken_detections: set[int] = set()
    chosen = []
    for k in order:
        o, d = int(objects[k]), int(detections[k])
        if o not in taken_objects and d not in taken_detections:
            taken_objects.add(o)
            taken_detections.add(d)
            chosen.append((o, d))
    return chosen


def confusion_matrix(
    ground_truth: dict[str, Any], detections: list[dict[str, Any]], score_threshold: float, iou_threshold: float = 0.5
) -> np.ndarray:
    """(K + 1) x (K + 1) counts, rows predicted, columns true, classes in ``ground_truth["categories"]``
    order and background last. ``detections`` are COCO results (image_id, category_id, bbox, score)."""
    index = {c["id"]: k for k, c in enumerate(ground_truth["categories"])}
    background = len(index)
    matrix = np.zeros((background + 1, background + 1), dtype=np.int64)
    objects: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in ground_truth["images"]}
    for ann in ground_truth["annotations"]:
        objects.setdefault(ann["image_id"], []).append(ann)
    found: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in objects}
    for det in detections:
        if det["score"] >= score_threshold:
            found.setdefault(det["image_id"], []).append(det)
    for image_id, anns in objects.items():
        real = [ann for ann in anns if not ann.get("iscrowd")]
        crowd = np.array([ann["bbox"] for ann in anns if ann.get("iscrowd")], dtype=np.float64).reshape(-1, 4)
        dets = found.get(image_id, [])
        true = np.array([ann["bbox"] for ann in real], dtype=np.float64).reshape(-1, 4)
        boxes = np.array([det["bbox"] for det in dets], dtype=np.float64).reshape(-1, 4)
        matched = pairs(iou_matrix(true, boxes), iou_threshold)
        for o, d in matched:
            matrix[index[dets[d]["category_id"]], index[real[o]["category_id"]]] += 1
        paired_objects, paired_detections = {o for o, _ in matched}, {d for _, d in matched}
        for o, ann in enumerate(real):
            if o not in paired_objects:
                matrix[background, index[ann["category_id"]]] += 1
        in_crowd = inside_fraction(boxes, crowd) > 0.5
        for d, det in enumerate(dets):
            if d not in paired_detections and not in_crowd[d]:
                matrix[index[det["category_id"]], background] += 1
    return matrix


def record(labels: list[str], matrix: np.ndarray, score_threshold: float, iou_threshold: float) -> dict[str, Any]:
    """The matrix as JSON (reports/evaluate/confusion.json): its labels, thresholds and counts."""
    return {
        "score_threshold": score_threshold,
        "iou_threshold": iou_threshold,
        "rows": "predicted class",
        "columns": "true class",
        "labels": [*labels, BACKGROUND],
        "matrix": matrix.tolist(),
    }


def plot(labels: list[str], matrix: np.ndarray, score_threshold: float, iou_threshold: float, images: int) -> bytes:
    """The matrix as Ultralytics draws it (each column divided by its total, blues), as PNG bytes."""
    from matplotlib.figure import Figure

    names = [*labels, BACKGROUND]
    totals = matrix.sum(axis=0, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    figure = Figure(figsize=(9, 7.5), dpi=100)
    axes = figure.add_subplot()
    image = axes.imshow(np.where(matrix > 0, shares, np.nan), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="none")
    for row, col in zip(*np.nonzero(matrix), strict=True):
        share = shares[row, col]
        colour = "white" if share > 0.45 else "black"
        axes.text(col, row, f"{share:.2f}\n({matrix[row, col]})", ha="center", va="center", fontsize=7, color=colour)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.set_xlabel("True")
    axes.set_ylabel("Predicted")
    axes.set_title(
        f"Confusion matrix, TFLite as the app runs it: {images} validation images\n"
        f"score >= {score_threshold:g}, IoU >= {iou_threshold:g}; columns sum to 1 (count in brackets)",
        fontsize=9,
    )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
