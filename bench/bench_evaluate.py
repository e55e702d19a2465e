"""COCO evaluation time: pycocotools vs faster-coco-eval, and proof that the numbers agree.

Synthetic validation set (--images, 9 classes, ~6 boxes per image) and detections (100
per image: jittered copies of the truth plus random boxes, random scores), evaluated by
stages.evaluate.coco_evaluate with each backend in fresh processes, median of --runs.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from common import OUT, machine, median, run_child, sized_args

ROOT = Path(__file__).resolve().parents[1]


def synthetic(images: int, seed: int = 0) -> tuple[dict, list[dict]]:
    rng = random.Random(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": i, "name": f"class{i}"} for i in range(1, 10)]}
    detections = []
    for image_id in range(1, images + 1):
        gt["images"].append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 640, "height": 480})
        for _ in range(rng.randint(1, 12)):
            w, h = rng.uniform(4, 300), rng.uniform(4, 300)
            box = [rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h]
            category = rng.randint(1, 9)
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": box,
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            jitter = [v + rng.gauss(0, 0.08 * max(w, h)) for v in box[:2]] + [
                w * rng.uniform(0.8, 1.2),
                h * rng.uniform(0.8, 1.2),
            ]
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": category if rng.random() < 0.8 else rng.randint(1, 9),
                    "bbox": jitter,
                    "score": rng.random(),
                }
            )
        while len(detections) < image_id * 100:
            w, h = rng.uniform(4, 300), rng.uniform(4, 300)
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": rng.randint(1, 9),
                    "score": rng.random() * 0.5,
                    "bbox": [rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h],
                }
            )
    return gt, detections


CHILD = """
import json, sys, time
sys.path.insert(0, ".")
from stages.evaluate import coco_evaluate
gt, dets = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
start = time.perf_counter()
result = coco_evaluate(gt, dets, sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - start, "overall": result["overall"], "per_class": result["per_class"]}))
"""


def main() -> None:
    args = sized_args(__doc__, images=2000)
    gt, detections = synthetic(args.images)
    gt_file, det_file = OUT / "eval_gt.json", OUT / "eval_dets.json"
    gt_file.write_text(json.dumps(gt))
    det_file.write_text(json.dumps(detections))
    results = {
        backend: [run_child(CHILD, str(gt_file), str(det_file), backend) for _ in range(args.runs)]
        for backend in ("pycocotools", "faster_coco_eval")
    }
    reference, fast = results["pycocotools"][0], results["faster_coco_eval"][0]
    deltas = [abs(reference["overall"][m] - fast["overall"][m]) for m in reference["overall"]]
    deltas += [
        abs(reference["per_class"][c][m] - fast["per_class"][c][m]) for c in reference["per_class"] for m in ("AP", "AP50")
    ]
    seconds = {backend: median([r["seconds"] for r in runs]) for backend, runs in results.items()}
    result = {
        "machine": machine(),
        "images": args.images,
        "ground_truth_boxes": len(gt["annotations"]),
        "detections": len(detections),
        "runs": args.runs,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "speedup": round(seconds["pycocotools"] / seconds["faster_coco_eval"], 2),
        "max_abs_difference": max(deltas),
        "AP": reference["overall"]["AP"],
    }
    (OUT / "evaluate.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if result["max_abs_difference"] > 1e-12:
        sys.exit("faster-coco-eval and pycocotools disagree")


if __name__ == "__main__":
    main()
