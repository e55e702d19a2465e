"""What filter.unrelabelled_lights does on the offline demo: counts and AP for exclude / traffic_light / ignore.

Runs the demo (testkit/demo.py: 300 synthetic scenes, the whole pipeline, 30 epochs from
scratch) once per choice and seed, each in its own folder, and collects from the finished
repository: the filter's and the split's counts, the ignore regions in validation, and the
COCO numbers of both models. The fixture has both kinds of unrelabelled light (lights the
overlay kept at 10, images it does not cover), about 15 of each per 300 scenes.

AP is the mean over classes, so `traffic_light` (one more class) and `exclude` (fewer validation
images) move it for reasons of their own: `AP_shared` is the mean per-class AP over the nine
classes every choice has, and the validation sets are reported beside it. `common` scores
every choice's TFLite model (as the app runs it) on the same images and labels: the 60
val2017 images with the unrelabelled lights as ignore regions (the `ignore` run's validation
labels, images read from the fixture), and the 52 of them without any (`exclude`'s own
validation set), nine classes (a `traffic_light` detection has no ground truth there and is
left out).

Writes bench/out/unrelabelled_lights.json. About 10-25 min per run on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import OUT, machine

ROOT = Path(__file__).resolve().parents[1]
CHOICES = ("exclude", "traffic_light", "ignore")
LIGHTS = ("traffic_light_red", "traffic_light_green", "traffic_light_na")


def measure(repo: Path, minutes: float) -> dict:
    read = lambda name: json.loads((repo / name).read_text())  # noqa: E731
    filtered, split, coco = read("reports/filter.json"), read("reports/split.json"), read("reports/evaluate/coco.json")
    shared = [name for name in coco["tflite"]["per_class"] if name != "traffic_light"]
    result = {
        "minutes": minutes,
        "selected": filtered["images"],
        "unrelabelled_lights": filtered.get("unrelabelled_lights"),
        "train_images": split["train"]["images"],
        "val_images": split["val"]["images"],
        "val_boxes": split["val"]["annotations"],
        "val_crowd_regions": split["val"]["crowd_regions"],
        "train_crowd_regions": split["train"]["crowd_regions"],
    }
    for model in ("tflite", "keras"):
        per_class = coco[model]["per_class"]
        result[model] = {
            "AP": coco[model]["AP"],
            "AP50": coco[model]["AP50"],
            "AP_shared": sum(per_class[name]["AP"] for name in shared) / len(shared),
            "AP50_lights": {name: per_class[name]["AP50"] for name in (*LIGHTS, "traffic_light") if name in per_class},
        }
    return result


def common_evaluation(runs: dict[str, Path]) -> dict[str, dict]:
    """TFLite AP of each choice's model on the same images and labels (``runs``: choice -> demo folder)."""
    sys.path.insert(0, str(ROOT))
    from stages.evaluate import coco_evaluate, tflite_detections

    read = lambda folder, name: json.loads((folder / "repo" / name).read_text())  # noqa: E731
    reference = read(runs["ignore"], "data/split/val/labels.json")
    subset = {image["id"] for image in read(runs["exclude"], "data/split/val/labels.json")["images"]}
    shared = {c["id"] for c in reference["categories"]}
    restricted = {
        **reference,
        "images": [image for image in reference["images"] if image["id"] in subset],
        "annotations": [ann for ann in reference["annotations"] if ann["image_id"] in subset],
    }
    results = {}
    for choice, folder in runs.items():
        own = read(folder, "data/split/val/labels.json")["categories"]  # the model's labels, for its detections
        detections = tflite_detections(
            folder / "repo/models/model.tflite", {**reference, "categories": own}, folder / "fixture/val2017", 100
        )
        detections = [d for d in detections if d["category_id"] in shared]
        results[choice] = {}
        for name, truth in ((f"{len(reference['images'])}_images", reference), (f"{len(subset)}_images", restricted)):
            kept = [d for d in detections if d["image_id"] in {image["id"] for image in truth["images"]}]
            overall = coco_evaluate(truth, kept)["overall"]
            results[choice][name] = {"AP": overall["AP"], "AP50": overall["AP50"]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--choices", nargs="+", default=list(CHOICES), choices=CHOICES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42], help="train.seed values")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--evaluate-kept", type=Path, help="only the common evaluation, of <dir>/<choice>-<seed> demo folders")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    out = OUT / "unrelabelled_lights.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    if args.evaluate_kept:
        for seed in args.seeds:
            common = common_evaluation({choice: args.evaluate_kept / f"{choice}-{seed}" for choice in CHOICES})
            for choice, numbers in common.items():
                results[f"{choice} seed {seed}"]["common"] = numbers
                print(f"{choice:13s} seed {seed}: TFLite on common images {numbers}", flush=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-lights.") as tmp:
        for seed in args.seeds:
            for choice in args.choices:
                folder = Path(tmp) / f"{choice}-{seed}"
                sets = [f"filter.unrelabelled_lights={choice}", f"train.seed={seed}"]
                command = [sys.executable, "-m", "testkit.demo", "--dir", str(folder), "--epochs", str(args.epochs)]
                subprocess.run([*command, *(f"--set={item}" for item in sets)], cwd=ROOT, check=True)
                minutes = json.loads((folder / "summary.json").read_text())["minutes"]
                load = os.getloadavg()[0]  # wall time depends on it; AP does not (training is deterministic)
                results[f"{choice} seed {seed}"] = {
                    "commit": commit,
                    "machine": machine(),
                    "load_average_at_end": round(load, 2),
                    **measure(folder / "repo", minutes),
                }
                out.write_text(json.dumps(results, indent=2) + "\n")
                row = results[f"{choice} seed {seed}"]
                print(
                    f"{choice:13s} seed {seed}: selected {row['selected']} train/val {row['train_images']}/{row['val_images']} "
                    f"val crowds {row['val_crowd_regions']}  TFLite AP {row['tflite']['AP']:.3f} "
                    f"(9 classes {row['tflite']['AP_shared']:.3f})  Keras AP {row['keras']['AP']:.3f} "
                    f"(9 classes {row['keras']['AP_shared']:.3f})",
                    flush=True,
                )
            if set(args.choices) == set(CHOICES):
                common = common_evaluation({choice: Path(tmp) / f"{choice}-{seed}" for choice in CHOICES})
                for choice, numbers in common.items():
                    results[f"{choice} seed {seed}"]["common"] = numbers
                    print(f"{choice:13s} seed {seed}: TFLite on common images {numbers}", flush=True)
                out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
