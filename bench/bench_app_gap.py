"""Where the app's AP parts from the Keras AP the evaluate stage reports: one model, step by step from Keras to the app.

Needs a repository whose evaluate stage has run (default: the demo's, .demo/repo, after
`make demo`). On its validation split, scored by the evaluate stage's own code:

  keras (evaluate)            ``keras_batch_detections``: boxes clipped to the model's square
                              before NMS, to the frame after it (the app's rule)
  keras, no clip after NMS    evaluate's Keras path without the app's clip: boxes may reach into the padding
  file on Keras' tensors      models/model.tflite fed each image's Model Maker tensor, its boxes
                              mapped onto the padded square and clipped to the frame, as the app does
  ... in Tasks' whole pixels  the same boxes cut to whole pixels the way MediaPipe Tasks reports them
  app (evaluate's tflite)     the file through ``AppDetector``: letterbox, Tasks' resize and its pixels

How Tasks turns the file's boxes into pixels is measured here, not assumed: on square frames
of the model's size (Tasks then resizes nothing), its boxes are compared with the file's own
output for the same normalised pixels. AP does not depend on machine load: no timing here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import OUT, machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.evaluate import coco_evaluate, detection_step, keras_batch_detections, tflite_detections  # noqa: E402
from trafficdet.app import clip_box  # noqa: E402


def tasks_pixels(model: Path, interpreter, frames: list[np.ndarray]) -> dict[str, float]:
    """Compare Tasks' integer boxes with the file's float boxes on square frames of the model's size (no resize).

    Returns, over every detection matched by score, the largest gap in pixels to each candidate
    rounding rule (0: that rule is Tasks'), and how many were matched.
    """
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions
    from mediapipe.tasks.python.vision import ObjectDetector, ObjectDetectorOptions

    inputs, outputs = interpreter.get_input_details()[0]["index"], [o["index"] for o in interpreter.get_output_details()]
    rules = {
        "floor corner, floor size": lambda x0, y0, x1, y1: (math.floor(x0), math.floor(y0), int(x1 - x0), int(y1 - y0)),
        "round corner, round size": lambda x0, y0, x1, y1: (round(x0), round(y0), round(x1 - x0), round(y1 - y0)),
        "floor both corners": lambda x0, y0, x1, y1: (
            math.floor(x0),
            math.floor(y0),
            math.floor(x1) - math.floor(x0),
            math.floor(y1) - math.floor(y0),
        ),
    }
    gaps, matched = dict.fromkeys(rules, 0.0), 0
    options = ObjectDetectorOptions(base_options=BaseOptions(model_asset_path=str(model)), max_results=100, score_threshold=0.0)
    with ObjectDetector.create_from_options(options) as detector:
        for frame in frames:
            side = frame.shape[0]
            interpreter.set_tensor(inputs, ((frame.astype(np.float32) - 127.5) / 127.5)[np.newaxis])
            interpreter.invoke()
            boxes, _, scores, count = (interpreter.get_tensor(i) for i in outputs)
            for found in detector.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=frame)).detections:
                score = found.categories[0].score
                i = int(np.argmin(np.abs(scores[0, : int(count[0])] - score)))
                if abs(scores[0, i] - score) > 1e-5:
                    continue
                matched += 1
                ymin, xmin, ymax, xmax = (boxes[0, i] * side).tolist()
                box = found.bounding_box
                got = (box.origin_x, box.origin_y, box.width, box.height)
                for name, rule in rules.items():
                    want = rule(xmin, ymin, xmax, ymax)
                    gaps[name] = max(gaps[name], max(abs(a - b) for a, b in zip(got, want, strict=True)))
    return {**{name: float(gap) for name, gap in gaps.items()}, "matched": matched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT / ".demo/repo")
    parser.add_argument("--out", type=Path, default=OUT / "app_gap.json")
    args = parser.parse_args()
    repo = args.repo.resolve()
    if not (repo / "reports/evaluate/coco.json").exists():
        sys.exit(f"{repo}: no evaluated model (run `make demo` first, or pass --repo)")
    os.chdir(repo)  # the stages' paths are relative to the repository
    from trafficdet.modelmaker.build import keras_model, preprocessor, restore_detector
    from trafficdet.modelmaker.cache import load_dataset, quiet_tensorflow
    from trafficdet.paths import TRAINED

    quiet_tensorflow()
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    ground_truth = json.loads(Path("data/split/val/labels.json").read_text())
    model_file = Path("models/model.tflite")
    detector = restore_detector(TRAINED, Path(tempfile.mkdtemp()))
    model = keras_model(detector)
    step = detection_step(model)
    interpreter = tf.lite.Interpreter(model_path=str(model_file))
    interpreter.allocate_tensors()
    inputs, outputs = interpreter.get_input_details()[0]["index"], [o["index"] for o in interpreter.get_output_details()]

    rows: dict[str, list[dict]] = {
        name: [] for name in ("keras (evaluate)", "keras, no clip after NMS", "file on Keras' tensors")
    }
    rows["file on Keras' tensors, Tasks' whole pixels"] = []
    crossing = dropped = 0
    square_frames = []
    batches = load_dataset("val").gen_tf_dataset(8, is_training=False, preprocess=preprocessor(detector))
    for x, y in batches:
        pred = step(x, y)
        rows["keras (evaluate)"] += keras_batch_detections(pred, y)
        info, ids = y["image_info"].numpy(), y["groundtruths"]["source_id"].numpy()
        for b in range(len(ids)):
            (height, width), (scale_y, scale_x) = info[b, 0], info[b, 2]
            for i in range(int(pred["num_detections"][b])):
                ymin, xmin, ymax, xmax = pred["detection_boxes"][b, i].numpy() / [scale_y, scale_x, scale_y, scale_x]
                crossing += xmax > width or ymax > height
                dropped += clip_box(xmin, ymin, xmax - xmin, ymax - ymin, int(width), int(height)) is None
                score = float(pred["detection_scores"][b, i])
                det = {"image_id": int(ids[b]), "category_id": int(pred["detection_classes"][b, i]), "score": score}
                rows["keras, no clip after NMS"].append(
                    {**det, "bbox": [float(xmin), float(ymin), float(xmax - xmin), float(ymax - ymin)]}
                )
            interpreter.set_tensor(inputs, x[b : b + 1].numpy())
            interpreter.invoke()
            boxes, classes, scores, count = (interpreter.get_tensor(i) for i in outputs)
            square = max(int(height), int(width))
            for i in range(int(count[0])):
                ymin, xmin, ymax, xmax = (boxes[0, i] * square).tolist()
                det = {"image_id": int(ids[b]), "category_id": int(classes[0, i]) + 1, "score": float(scores[0, i])}
                box = clip_box(xmin, ymin, xmax - xmin, ymax - ymin, int(width), int(height))
                if box is not None:
                    rows["file on Keras' tensors"].append({**det, "bbox": list(box)})
                whole = clip_box(math.floor(xmin), math.floor(ymin), int(xmax - xmin), int(ymax - ymin), int(width), int(height))
                if whole is not None:
                    rows["file on Keras' tensors, Tasks' whole pixels"].append({**det, "bbox": list(whole)})
            if len(square_frames) < 8:  # the model's own input back in 8-bit pixels: a square Tasks does not resize
                square_frames.append(np.clip(np.round(x[b].numpy() * 127.5 + 127.5), 0, 255).astype(np.uint8))
    how = tasks_pixels(model_file, interpreter, square_frames)
    rows["app (evaluate's tflite)"] = tflite_detections(model_file, ground_truth, Path("data/images"), 100)

    results = {}
    for name, detections in rows.items():
        overall = coco_evaluate(ground_truth, detections, "faster_coco_eval")["overall"]
        results[name] = {metric: round(overall[metric], 4) for metric in ("AP", "AP50", "AP75", "AR100")}
        results[name]["detections"] = len(detections)
        print(f"{name:45s} " + " ".join(f"{k} {v}" for k, v in results[name].items()), flush=True)
    summary = {
        "machine": machine(),
        "repo": str(repo),
        "val_images": len(ground_truth["images"]),
        "keras_boxes_crossing_the_frame": int(crossing),
        "keras_boxes_wholly_in_the_padding": int(dropped),
        "tasks_pixel_rule_largest_gap": how,
        "results": results,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
