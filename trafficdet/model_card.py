"""models/MODEL_CARD.md: what the app must feed the shipped model, and the AP it should then get.

Written by the evaluate stage (the expected AP is only known after evaluation) from what
export declared in models/metadata.json and what evaluate measured; nothing else goes in,
so the card is a function of the stage's declared deps.
"""

from __future__ import annotations

from typing import Any

OVERALL = ("AP", "AP50", "AP75", "AR100")


def _number(value: float) -> str:
    return "n/a" if value < 0 else f"{value:.3f}"  # -1: no such object in the validation set


def confusions(confusion: dict[str, Any]) -> list[str]:
    """Per true class: how many were found as themselves, taken for which other class, or missed;
    then the false alarms, and red lights taken for green and back (``confusion``: confusion.record)."""
    names, matrix = confusion["labels"], confusion["matrix"]
    background = len(names) - 1
    lines = [
        "| class | objects | found as itself | taken for another class | missed |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for k, name in enumerate(names[:background]):
        column = [row[k] for row in matrix]
        wrong = sorted(((column[j], names[j]) for j in range(background) if j != k and column[j]), key=lambda c: (-c[0], c[1]))
        taken = ", ".join(f"{other} {count}" for count, other in wrong) or "-"
        lines.append(f"| {name} | {sum(column)} | {column[k]} | {taken} | {column[background]} |")
    alarms = [row[background] for row in matrix]  # the background column: detections of no object
    by_class = ", ".join(f"{names[j]} {alarms[j]}" for j in range(background) if alarms[j]) or "none"
    lines += ["", f"False alarms (a detection where no object is): {sum(alarms)} ({by_class})."]
    if {"traffic_light_red", "traffic_light_green"} <= set(names):
        red, green = names.index("traffic_light_red"), names.index("traffic_light_green")
        red_total, green_total = sum(row[red] for row in matrix), sum(row[green] for row in matrix)
        lines.append(
            f"Red lights called green: {matrix[green][red]} of {red_total}; green lights called red: "
            f"{matrix[red][green]} of {green_total}."
        )
    return lines


def render(
    metadata: dict[str, Any],
    keras: dict[str, Any],
    tflite: dict[str, Any],
    val_images: int,
    size_bytes: int,
    confusion: dict[str, Any],
) -> str:
    """The card as Markdown; ``keras`` / ``tflite`` are ``coco_evaluate`` results, ``confusion`` the
    TFLite file's confusion matrix (trafficdet.confusion.record)."""
    contract = metadata["input"]
    side = metadata["input_size"][0]
    classes = metadata["labels"]
    step = metadata["detection_step"]
    floor = step["score_threshold"]
    lines = [
        f"# {metadata['name']}: model card",
        "",
        "Written by the evaluate stage from models/metadata.json and the evaluation below; do not edit.",
        "",
        "## The model",
        "",
        f"- File: models/model.tflite ({size_bytes / 2**20:.2f} MB), {metadata['quantization']}, "
        f"TFLite with MediaPipe metadata (labels, normalisation); its detection step (per-class NMS) is inside",
        f"- Architecture: {metadata['architecture']} SSD, input {side} x {side} RGB, start point: {metadata['init']}, "
        f"{metadata['trained_epochs']} epoch{'s' if metadata['trained_epochs'] != 1 else ''}",
        f"- Classes ({len(classes)}): {', '.join(classes)} (class output k is the k-th, from 0)",
        f"- Detection step inside the file: per class, the {step['pre_nms_top_k']} best scores, NMS at IoU "
        f"{step['nms_iou_threshold']:g}; then the {step['max_detections']} best boxes over all classes. It drops every "
        f"box scoring below {floor:g} itself: no `score_threshold` brings one back, not even 0, so a model "
        "that has not learned yet returns no box at all.",
        "",
        "## What the app must feed it",
        "",
        "1. An RGB frame, 8 bits per channel, of any size W x H.",
        f"2. Pad it to a square of side max(W, H): the frame at the top-left corner, the rest filled with "
        f"RGB ({', '.join(str(v) for v in contract['pad_value'])}). Do not resize or centre it: MediaPipe Tasks "
        f"resizes the square to {side} x {side}, which reproduces the letterbox the model was trained on.",
        "3. Run it through MediaPipe Tasks' ObjectDetector; no option is needed (the model does its own NMS, "
        "per class, as the Keras model does); pick your own `score_threshold` "
        f"(the file returns nothing below {floor:g} anyway).",
        "4. Boxes come back in the square's pixels, which are the frame's pixels (the frame sits at the origin): "
        "clip them to W x H and drop any left empty. A box can carry several categories (the model keeps it for "
        "each class it scores): each category is a detection.",
        "",
        "Reference implementation: `trafficdet/app.py` (`letterbox`, `AppDetector`). Feeding the raw frame "
        "instead (Tasks then stretches it) costs accuracy: see docs/app.md.",
        "",
        "## Expected accuracy",
        "",
        f"COCO metrics on the {val_images} validation images (data/split/val), the TFLite file run exactly as above; "
        "the Keras model beside it is the trained float model in Model Maker's own pipeline.",
        "",
        "| | " + " | ".join(OVERALL) + " |",
        "| --- |" + " ---: |" * len(OVERALL),
        "| TFLite, as the app runs it | " + " | ".join(_number(tflite["overall"][m]) for m in OVERALL) + " |",
        "| Keras (float, Model Maker) | " + " | ".join(_number(keras["overall"][m]) for m in OVERALL) + " |",
        "",
        "| class | TFLite AP | Keras AP | TFLite AP50 | Keras AP50 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in classes:
        ours, theirs = tflite["per_class"][name], keras["per_class"][name]
        lines.append(
            f"| {name} | {_number(ours['AP'])} | {_number(theirs['AP'])} | {_number(ours['AP50'])} | {_number(theirs['AP50'])} |"
        )
    lines += [
        "",
        "## What it takes each object for",
        "",
        f"The TFLite file as above on the same images, its detections scoring at least {confusion['score_threshold']:g} "
        f"paired with the objects at IoU >= {confusion['iou_threshold']:g} whatever their class (the confusion matrix, "
        "as Ultralytics draws it: reports/evaluate/confusion.json, the picture in "
        "reports/evaluate/plots/images/confusion_matrix.png).",
        "",
        *confusions(confusion),
    ]
    return "\n".join(lines) + "\n"
