"""How the frame the app hands MediaPipe Tasks changes the shipped model's AP, against the Keras model's.

Needs a repository whose evaluate stage has run (default: the demo's, .demo/repo, after
`make demo`). Scores its models/model.tflite through MediaPipe Tasks on the validation
set under several input geometries, each with the images decoded by TensorFlow (as training
and the evaluation decode them) and by Pillow (another JPEG decoder: how sensitive the model
is to a level here and there), and puts each next to the Keras AP the evaluate stage
measured (Model Maker's own letterbox pipeline). AP does not depend on machine load: no
timing here.
Targets: TFLite AP within 0.02 of Keras; car/bus/truck AP50 each within 0.05.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from common import OUT, machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.evaluate import coco_evaluate  # noqa: E402
from trafficdet.app import PAD_VALUE, clip_box, letterbox, read_frame  # noqa: E402

LARGE_CLASSES = ("car", "bus", "truck")


def stretch(frame: np.ndarray) -> np.ndarray:
    """The raw frame: Tasks stretches it to the model's square."""
    return frame


def pad_centred(frame: np.ndarray, fill: int) -> np.ndarray:
    height, width = frame.shape[:2]
    side = max(height, width)
    square = np.full((side, side, 3), fill, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = frame
    return square


GEOMETRIES = {
    "stretch": (stretch, (0, 0)),
    "letterbox top-left, grey 128 (the app contract)": (letterbox, (0, 0)),
    "letterbox top-left, black": (lambda frame: letterbox(frame, fill=0), (0, 0)),
    "letterbox centred, grey 128": (lambda frame: pad_centred(frame, PAD_VALUE), None),
}


def read_with_pillow(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


DECODERS = {"tensorflow": read_frame, "pillow": read_with_pillow}


def detections(model: Path, ground_truth: dict, images: Path, geometry: str, decoder: str) -> list[dict]:
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions
    from mediapipe.tasks.python.vision import ObjectDetector, ObjectDetectorOptions

    prepare, origin = GEOMETRIES[geometry]
    ids = {c["name"]: c["id"] for c in ground_truth["categories"]}
    options = ObjectDetectorOptions(
        base_options=BaseOptions(model_asset_path=str(model)),
        max_results=100,
        score_threshold=0.0,
    )
    found = []
    with ObjectDetector.create_from_options(options) as detector:
        for image in ground_truth["images"]:
            frame = DECODERS[decoder](images / image["file_name"])
            height, width = frame.shape[:2]
            square = np.ascontiguousarray(prepare(frame))
            side = square.shape[0]
            dy, dx = origin if origin is not None else ((side - height) // 2, (side - width) // 2)
            if geometry == "stretch":  # Tasks reports boxes in the frame it was given: the raw frame
                dy = dx = 0
            result = detector.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=square))
            for detection in result.detections:
                box = detection.bounding_box
                clipped = clip_box(box.origin_x - dx, box.origin_y - dy, box.width, box.height, width, height)
                for category in detection.categories if clipped is not None else []:  # each: see AppDetector.detect
                    found.append(
                        {
                            "image_id": image["id"],
                            "category_id": ids[category.category_name],
                            "score": category.score,
                            "bbox": list(clipped),
                        }
                    )
    return found


def row(result: dict) -> dict:
    return {
        "AP": round(result["overall"]["AP"], 4),
        "AP50": round(result["overall"]["AP50"], 4),
        "AR100": round(result["overall"]["AR100"], 4),
        **{f"AP50_{name}": round(result["per_class"][name]["AP50"], 4) for name in LARGE_CLASSES},
        "per_class": {name: {k: round(v, 4) for k, v in values.items()} for name, values in result["per_class"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT / ".demo/repo")
    parser.add_argument("--out", type=Path, default=OUT / "app_input.json")
    args = parser.parse_args()
    metrics_file = args.repo / "reports/evaluate/coco.json"
    if not metrics_file.exists():
        sys.exit(f"{args.repo}: no evaluated model (run `make demo` first, or pass --repo)")
    keras_metrics = json.loads(metrics_file.read_text())["keras"]
    ground_truth = json.loads((args.repo / "data/split/val/labels.json").read_text())
    keras = {
        "AP": keras_metrics["AP"],
        "AP50": keras_metrics["AP50"],
        "AR100": keras_metrics["AR100"],
        **{f"AP50_{name}": keras_metrics["per_class"][name]["AP50"] for name in LARGE_CLASSES},
        "per_class": keras_metrics["per_class"],
    }
    results = {"keras (the evaluate stage's)": keras}
    for geometry in GEOMETRIES:
        for decoder in DECODERS:
            name = f"tflite: {geometry}, {decoder} decoder"
            dets = detections(args.repo / "models/model.tflite", ground_truth, args.repo / "data/images", geometry, decoder)
            results[name] = row(coco_evaluate(ground_truth, dets, "faster_coco_eval"))
            print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'per_class'})}", flush=True)
    for values in results.values():
        values["meets_targets"] = abs(values["AP"] - keras["AP"]) <= 0.02 and all(
            abs(values[f"AP50_{name}"] - keras[f"AP50_{name}"]) <= 0.05 for name in LARGE_CLASSES
        )
    summary = {
        "machine": machine(),
        "repo": str(args.repo),
        "architecture": json.loads((args.repo / "models/train/train.json").read_text())["architecture"],
        "val_images": len(ground_truth["images"]),
        "results": results,
    }
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{'':60s} {'AP':>6s} {'AP50':>6s} {'AR100':>6s} " + " ".join(f"{n:>6s}" for n in LARGE_CLASSES) + "  targets")
    for name, values in results.items():
        large = " ".join(f"{values[f'AP50_{n}']:6.3f}" for n in LARGE_CLASSES)
        print(f"{name:60s} {values['AP']:6.3f} {values['AP50']:6.3f} {values['AR100']:6.3f} {large}  {values['meets_targets']}")


if __name__ == "__main__":
    main()
