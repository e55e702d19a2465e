"""evaluate: COCO metrics of the trained Keras model and of the shipped TFLite file.

(a) the Keras model restored from models/train, fed by Model Maker's own eval pipeline
    over data/cache/val, its boxes clipped by the app's rule (``keras_batch_detections``);
(b) models/model.tflite run through MediaPipe Tasks' ObjectDetector over the validation
    images, as the app runs it (trafficdet/app.py: letterbox to a square, background denied,
    boxes clipped to the frame). Both are scored by
    pycocotools' COCOeval (or faster-coco-eval, which gives identical numbers) against
    data/split/val/labels.json. Writes, with dvclive, reports/evaluate/:
    metrics.json                          the headline (DVC metrics, `dvc exp show` columns):
                                          tflite AP, AP50 and AP50 per class; keras AP, AP50
    coco.json                             every number: keras/tflite AP ... AR100, per-class
                                          AP / AP50, the Keras val losses (`dvc metrics show
                                          reports/evaluate/coco.json`)
    plots/ap/{keras,tflite}.json          per-class AP (bars)
    plots/pr/<model>_<class>.json         precision-recall curve per class (IoU 0.5)
    plots/images/predictions.png          validation images: ground truth and TFLite boxes
    plots/images/confusion_matrix.png     which class the TFLite file takes each object for
    confusion.json                        ... as counts (trafficdet/confusion.py)
    detections.json                       the TFLite detections scored (COCO results format;
                                          DVC-cached: large); `make predict` gives the same
and models/MODEL_CARD.md: the input the app must feed the model (from models/metadata.json),
the AP it then gets (this evaluation), per class beside the Keras model's, and its confusions.
"""

from __future__ import annotations

import contextlib
import copy
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np

import trafficdet.confusion as confusion
from trafficdet.app import AppDetector, clip_box, read_frame
from trafficdet.errors import PipelineError, run_stage
from trafficdet.io import atomic_dir, read_json, remove_stale_temps, write_bytes, write_json
from trafficdet.model_card import render as render_model_card
from trafficdet.modelmaker.build import keras_model, preprocessor, restore_detector
from trafficdet.modelmaker.cache import load_dataset, quiet_tensorflow
from trafficdet.params import EvaluateParams, load
from trafficdet.paths import (
    EVALUATE_CONFUSION,
    EVALUATE_CONFUSION_PLOT,
    EVALUATE_DETAILS,
    EVALUATE_DETECTIONS,
    EVALUATE_LIVE,
    IMAGE_STORE,
    MODEL,
    MODEL_CARD,
    MODEL_METADATA,
    TRAINED,
    split_labels,
)

METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"]
CONFUSION_IOU = 0.5  # a detection and an object are a pair at COCO's AP50 overlap


def coco_evaluate(ground_truth: dict[str, Any], detections: list[dict[str, Any]], backend: str = "pycocotools") -> dict[str, Any]:
    """COCO bbox metrics, overall and per class, with the per-class PR curves at IoU 0.5.

    -1 means undefined, as in pycocotools (e.g. APs when there are no small objects), also
    when there is no detection at all (a class with ground truth then scores 0). The
    ground truth goes to COCOeval as it is: its ``iscrowd: 1`` regions make detections
    matched to them ignored (neither true nor false positives), its ``area`` sets the
    small/medium/large ranges.
    """
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):  # both libraries print as they go
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        # COCOeval records a match by the ground truth's id and reads id 0 as "no match": a
        # labels.json numbering annotations from 0 would score its first box as missed.
        for number, ann in enumerate(gt.dataset["annotations"], start=1):
            ann["id"] = number
        gt.createIndex()
        if detections:
            dt = gt.loadRes(copy.deepcopy(detections))
        else:  # pycocotools' loadRes fails on an empty list; no detection still scores (0, or -1 where undefined)
            dt = COCO()
            dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
            dt.createIndex()
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = np.asarray(evaluator.eval["precision"])  # [IoU T, recall R, class K, area A, maxDets M]
    recall_points = np.asarray(evaluator.params.recThrs)
    result: dict[str, Any] = {
        "overall": {m: float(v) for m, v in zip(METRICS, evaluator.stats[:9], strict=True)},
        "per_class": {},
        "pr": {},
    }
    for k, category_id in enumerate(evaluator.params.catIds):
        all_iou = precision[:, :, k, 0, -1]
        at_50 = precision[0, :, k, 0, -1]
        name = names[category_id]
        result["per_class"][name] = {
            "AP": float(all_iou[all_iou > -1].mean()) if (all_iou > -1).any() else -1.0,
            "AP50": float(at_50[at_50 > -1].mean()) if (at_50 > -1).any() else -1.0,
        }
        result["pr"][name] = [
            {"recall": round(float(r), 2), "precision": max(float(p), 0.0)} for r, p in zip(recall_points, at_50, strict=True)
        ]
    return result


def keras_detections(detector: Any, batch_size: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Detections of the Keras model over the val cache, in original-image pixels, and its val losses."""
    model = keras_model(detector)
    step = detection_step(model)
    dataset = load_dataset("val").gen_tf_dataset(batch_size, is_training=False, preprocess=preprocessor(detector))
    model.reset_metrics()
    detections = []
    for x, y in dataset:
        detections += keras_batch_detections(step(x, y), y)
    losses = model.get_metrics_result()
    return detections, {f"val_{name}": float(value) for name, value in losses.items()}


def detection_step(model: Any) -> Any:
    """Model Maker's ``test_step`` (it updates the model's loss metrics) that also returns the detections.

    One compiled pass gives both the val losses and the detections, where ``model.evaluate`` and
    then calling the model op by op ran the network twice (timed in BENCHMARKS.md, "make test from
    a fresh clone"). The losses are Keras' to the bit; the scores differ from eager ones by float32
    rounding only.
    """
    import tensorflow as tf

    @tf.function(reduce_retracing=True)  # as Keras' own test function: a last partial batch does not retrace twice
    def step(x: Any, y: Any) -> Any:
        pred = model(x, anchor_boxes=y["anchor_boxes"], image_shape=y["image_info"][:, 1, :], training=False)
        model.compute_loss(x, y, pred)
        return pred

    return step


def keras_batch_detections(pred: Any, y: Any) -> list[dict[str, Any]]:
    """The Keras model's detections of one batch of Model Maker's eval pipeline (``detection_step``'s
    output for it), boxes clipped as the app's are.

    One clipping rule for the Keras model and the shipped file (tests/test_learned_model.py checks
    they agree): the decoded boxes are clipped to the model's whole input square before NMS,
    which is all the file can do (Tasks hands it the letterboxed square and nothing says
    where the frame ends inside it); ``image_info`` row 1 is that square (Model Maker's
    output size, not the size of the image scaled into it). After NMS each box is mapped
    back to the frame and clipped to it, and one wholly in the padding is dropped, as
    ``trafficdet.app.AppDetector`` does.
    """
    boxes, scores = pred["detection_boxes"].numpy(), pred["detection_scores"].numpy()
    classes, counts = pred["detection_classes"].numpy(), pred["num_detections"].numpy()
    info, ids = y["image_info"].numpy(), y["groundtruths"]["source_id"].numpy()
    detections = []
    for b in range(len(ids)):
        (height, width), (scale_y, scale_x) = info[b, 0], info[b, 2]  # rows: original size, square, scale, offset
        for i in range(int(counts[b])):
            ymin, xmin, ymax, xmax = boxes[b, i] / [scale_y, scale_x, scale_y, scale_x]
            clipped = clip_box(xmin, ymin, xmax - xmin, ymax - ymin, int(width), int(height))
            if clipped is not None:
                found = {"image_id": int(ids[b]), "category_id": int(classes[b, i]), "score": float(scores[b, i])}
                detections.append({**found, "bbox": list(clipped)})
    return detections


def tflite_detections(model: Path, ground_truth: dict[str, Any], image_dir: Path, max_results: int) -> list[dict[str, Any]]:
    """Detections of the exported file through MediaPipe Tasks, with the app's pre- and post-processing."""
    ids = {c["name"]: c["id"] for c in ground_truth["categories"]}
    detections = []
    with AppDetector(model, max_results=max_results, score_threshold=0.0) as detector:
        for image in ground_truth["images"]:
            for found in detector.detect(read_frame(image_dir / image["file_name"])):
                detections.append(
                    {"image_id": image["id"], "category_id": ids[found.label], "score": found.score, "bbox": list(found.box)}
                )
    return detections


def prediction_grid(
    ground_truth: dict[str, Any], detections: list[dict[str, Any]], image_dir: Path, count: int = 8, min_score: float = 0.3
):
    """A 4-wide grid of validation images: ground truth in green (crowd regions in yellow), predictions in red."""
    from PIL import Image, ImageDraw

    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    images = ground_truth["images"][:count]
    tiles = []
    for image in images:
        tile = Image.open(image_dir / image["file_name"]).convert("RGB")
        draw = ImageDraw.Draw(tile)
        for ann in ground_truth["annotations"]:
            if ann["image_id"] == image["id"]:
                x, y, w, h = ann["bbox"]
                draw.rectangle([x, y, x + w, y + h], outline=(230, 200, 0) if ann.get("iscrowd") else (0, 220, 0), width=2)
        for det in detections:
            if det["image_id"] == image["id"] and det["score"] >= min_score:
                x, y, w, h = det["bbox"]
                draw.rectangle([x, y, x + w, y + h], outline=(255, 0, 0), width=1)
                draw.text((x + 2, y + 1), f"{names[det['category_id']]} {det['score']:.2f}", fill=(255, 0, 0))
        tiles.append(tile)
    width, height = max(t.width for t in tiles), max(t.height for t in tiles)
    columns = min(4, len(tiles))
    grid = Image.new("RGB", (columns * width, -(-len(tiles) // columns) * height), (255, 255, 255))
    for index, tile in enumerate(tiles):
        grid.paste(tile, ((index % columns) * width, (index // columns) * height))
    return grid


def headline(keras: dict[str, Any], tflite: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The numbers an experimenter compares (DVC metrics, so `dvc exp show` columns): AP and AP50 of
    the shipped TFLite file and of the Keras model, and the TFLite AP50 of each class."""
    per_class = {f"AP50_{name}": values["AP50"] for name, values in tflite["per_class"].items()}
    return {
        "tflite": {"AP": tflite["overall"]["AP"], "AP50": tflite["overall"]["AP50"], **per_class},
        "keras": {"AP": keras["overall"]["AP"], "AP50": keras["overall"]["AP50"]},
    }


def details(result: dict[str, Any], extra: dict[str, float]) -> dict[str, Any]:
    """All of one model's COCO numbers (and ``extra``), rounded as the metrics are: reports/evaluate/coco.json."""
    return {
        **{metric: round(value, 4) for metric, value in (result["overall"] | extra).items()},
        "per_class": {name: {k: round(v, 4) for k, v in values.items()} for name, values in result["per_class"].items()},
    }


def write_plots(model: str, result: dict[str, Any], out: Path) -> None:
    write_json(
        out / "plots/ap" / f"{model}.json",
        [{"class": name, "AP": max(v["AP"], 0.0)} for name, v in result["per_class"].items()],
        indent=True,
    )
    for name, curve in result["pr"].items():
        write_json(out / "plots/pr" / f"{model}_{name}.json", curve, indent=True)


def evaluate(params: EvaluateParams) -> dict[str, dict[str, Any]]:
    backend = params.backend
    if not MODEL.exists():
        raise PipelineError(f"{MODEL}: missing; run the export stage first")
    metadata = read_json(MODEL_METADATA)
    if "input" not in metadata or "detection_step" not in metadata:
        raise PipelineError(f"{MODEL_METADATA}: written by an older export (no input contract or detection step); rerun export")
    ground_truth = read_json(split_labels("val"))
    quiet_tensorflow()
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()  # the same metrics from the same model, as train does

    from dvclive import Live

    detector = restore_detector(TRAINED, TRAINED)
    keras_dets, losses = keras_detections(detector, params.batch_size)
    keras = coco_evaluate(ground_truth, keras_dets, backend)
    tflite_dets = tflite_detections(MODEL, ground_truth, IMAGE_STORE, params.max_detections)
    tflite = coco_evaluate(ground_truth, tflite_dets, backend)
    labels = [c["name"] for c in ground_truth["categories"]]
    threshold = params.confusion_score_threshold
    matrix = confusion.confusion_matrix(ground_truth, tflite_dets, threshold, CONFUSION_IOU)
    confusions = confusion.record(labels, matrix, threshold, CONFUSION_IOU)
    with atomic_dir(EVALUATE_LIVE) as out, Live(str(out), dvcyaml=False, save_dvc_exp=False) as live:  # all or nothing
        if (EVALUATE_LIVE / ".gitignore").is_file():  # DVC's entry for the cached detections.json: keep it
            shutil.copy2(EVALUATE_LIVE / ".gitignore", out / ".gitignore")
        for model, numbers in headline(keras, tflite).items():
            for name, value in numbers.items():
                live.log_metric(f"{model}/{name}", round(value, 4), plot=False)
        write_json(out / EVALUATE_DETAILS.name, {"keras": details(keras, losses), "tflite": details(tflite, {})}, indent=True)
        write_plots("keras", keras, out)
        write_plots("tflite", tflite, out)
        live.log_image("predictions.png", prediction_grid(ground_truth, tflite_dets, IMAGE_STORE))
        picture = confusion.plot(labels, matrix, threshold, CONFUSION_IOU, len(ground_truth["images"]))
        write_bytes(out / EVALUATE_CONFUSION_PLOT.relative_to(EVALUATE_LIVE), picture)
        write_json(out / EVALUATE_CONFUSION.name, confusions, indent=True)
        write_json(out / EVALUATE_DETECTIONS.name, tflite_dets)
    card = render_model_card(metadata, keras, tflite, len(ground_truth["images"]), MODEL.stat().st_size, confusions)
    write_bytes(MODEL_CARD, card.encode())
    return {"keras": keras["overall"], "tflite": tflite["overall"]}


def main() -> None:
    params = load(EvaluateParams)
    remove_stale_temps(MODEL_CARD)
    results = evaluate(params)
    print("evaluate: " + "; ".join(f"{model} AP {r['AP']:.3f} AP50 {r['AP50']:.3f}" for model, r in results.items()))


if __name__ == "__main__":
    run_stage(main)
