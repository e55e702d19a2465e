"""What the selection rule and the default split give: measured on the fixtures, estimated at COCO scale.

Runs stages.filter.filter_dataset and stages.split.split_dataset with params.yaml's filter:
and split: sections (images_per_class etc. as committed) on
  fixture-40   the test fixture (tests/conftest.py: 40 scenes, bad boxes, one corrupt JPEG)
  fixture-300  the offline demo's fixture (testkit/demo.py: 300 scenes)
  coco-scale   a synthetic COCO 2017 with its per-category image counts (below) for the 7
               classes the default config uses, class presence drawn independently per
               image (COCO's co-occurrence is not modelled), and a cocoTraffic-like overlay
               that covers every traffic light and leaves 6.9% of them at 10 (its README at
               commit 0b20996: 890 of train2017's 12,884 lights "discarded due to mislabelled or
               otherwise corrupt labels", 772 + 118 over its own train / val split).
               A computed estimate, not a measurement of the real files (no internet here).
Writes bench/out/selection.json and prints a table for BENCHMARKS.md ("Selection counts").
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import zipfile
from pathlib import Path

import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import OUT

from stages.filter import filter_dataset
from stages.split import split_dataset
from testkit.fixture import ANNOTATIONS_ZIP, RELABEL_ZIP, generate
from trafficdet.params import FilterParams, SplitParams, parse

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("train", "val")
# COCO 2017 images holding each category (instances_train2017.json / instances_val2017.json,
# as commonly tabulated; not re-counted here), and its traffic-light boxes.
COCO_IMAGES = {
    "train2017": {
        "person": 64115,
        "bicycle": 3252,
        "car": 12251,
        "motorcycle": 3502,
        "bus": 3952,
        "truck": 6127,
        "traffic light": 4139,
    },
    "val2017": {"person": 2693, "bicycle": 149, "car": 535, "motorcycle": 159, "bus": 189, "truck": 250, "traffic light": 191},
}
POOL_SIZE = {"train2017": 118_287, "val2017": 5_000}
# COCO 2017's traffic-light boxes. cocoTraffic's table (README, commit 0b20996) adds up to the same
# train2017 count: 3,131 red + 1,794 green + 7,069 na + 890 discarded = 12,884. (This file said
# 12,842, a transcription slip that the docs repeated.)
LIGHT_BOXES = {"train2017": 12_884, "val2017": 634}
MISLABELLED_SHARE = 890 / 12_884
COLOUR_SHARE = {92: 3131, 93: 1794, 94: 7069}  # cocoTraffic's red / green / na boxes (README, commit 0b20996)
HANDLINGS = ("exclude", "traffic_light", "ignore")  # filter.unrelabelled_lights
CATEGORY_IDS = {"person": 1, "bicycle": 2, "car": 3, "motorcycle": 4, "bus": 6, "truck": 8, "traffic light": 10}


def params() -> tuple[FilterParams, SplitParams]:
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    return parse(FilterParams, committed["filter"]), parse(SplitParams, committed["split"])


def run_rule(annotation_files: list[Path], relabel_files: list[Path], unusable: set[str] = frozenset()) -> dict:
    """Filter then split as the stages do; the counts the docs quote."""
    filter_params, split_params = params()
    result = {}
    for handling in HANDLINGS:
        chosen = filter_params.model_copy(update={"unrelabelled_lights": handling})
        coco, _, report = filter_dataset(annotation_files, relabel_files, chosen)
        usable = {image["file_name"] for image in coco["images"]} - unusable
        _, split = split_dataset(coco, usable, split_params.method, split_params.val_fraction, split_params.seed)
        result[handling] = {
            "selected": report["images"],
            "by_origin": report["origins"],
            "selection": report["selection"],
            "unrelabelled_lights": report.get("unrelabelled_lights"),
            "crowd_regions": report["crowd_regions"],
            "split": {side: {key: split[side][key] for key in ("images", "origins", "crowd_regions")} for side in SIDES},
            "per_class_images": {
                name: {side: split[side]["classes"][name]["images"] for side in ("train", "val")}
                for name in split["val"]["classes"]
            },
        }
    return result


def fixture_counts(images: int, tmp: Path, **options: object) -> dict:
    root = tmp / f"fixture-{images}"
    manifest = generate(root, images=images, seed=0, **options)
    files = []
    with zipfile.ZipFile(root / ANNOTATIONS_ZIP) as zf:
        for split in ("train2017", "val2017"):
            files.append(root / f"instances_{split}.json")
            files[-1].write_bytes(zf.read(f"annotations/instances_{split}.json"))
    relabel = []
    with zipfile.ZipFile(root / RELABEL_ZIP) as zf:
        for name in zf.namelist():
            relabel.append(root / Path(name).name)
            relabel[-1].write_bytes(zf.read(name))
    corrupt = {
        f"{100 + index * 7:012d}.jpg" for index in range(int(options.get("corrupt_images", 0)))
    }  # as the images stage rejects them
    return {"gaps": manifest["gaps"], **run_rule(files, relabel, corrupt)}


def synthetic_coco(tmp: Path, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """COCO 2017's per-category image counts with independent presence, plus a cocoTraffic-like overlay."""
    rng = random.Random(seed)
    files, overlay = [], []
    next_image, next_ann = 1, 1
    for pool, size in POOL_SIZE.items():
        ids = list(range(next_image, next_image + size))
        next_image += size
        images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in ids]
        annotations = []
        for name, count in COCO_IMAGES[pool].items():
            holders = rng.sample(ids, count)
            boxes = [1] * count
            if name == "traffic light":
                for _ in range(LIGHT_BOXES[pool] - count):  # the rest of the light boxes, over the same images
                    boxes[rng.randrange(count)] += 1
            for image_id, n in zip(holders, boxes, strict=True):
                for _ in range(n):
                    box = [rng.uniform(0, 560), rng.uniform(0, 400), rng.uniform(8, 80), rng.uniform(8, 80)]
                    annotations.append(
                        {"id": next_ann, "image_id": image_id, "category_id": CATEGORY_IDS[name], "bbox": box, "iscrowd": 0}
                    )
                    next_ann += 1
        for ann in annotations:
            if ann["category_id"] == 10:
                kept_at_10 = rng.random() < MISLABELLED_SHARE
                colour = rng.choices(list(COLOUR_SHARE), list(COLOUR_SHARE.values()))[0]
                overlay.append({**ann, "category_id": 10 if kept_at_10 else colour})
        categories = [{"id": i, "name": name} for name, i in CATEGORY_IDS.items()]
        files.append(tmp / f"instances_{pool}.json")
        files[-1].write_bytes(orjson.dumps({"images": images, "annotations": annotations, "categories": categories}))
    relabel = tmp / "instances_train_traffic.json"
    colours = [
        {"id": 92, "name": "traffic_light_red"},
        {"id": 93, "name": "traffic_light_green"},
        {"id": 94, "name": "traffic_light_na"},
    ]
    relabel.write_bytes(orjson.dumps({"images": [], "annotations": overlay, "categories": colours}))
    return files, [relabel]


def main() -> None:
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "fixture-40": fixture_counts(40, Path(tmp), bad_boxes=True, corrupt_images=1),
            "fixture-300": fixture_counts(300, Path(tmp)),
            "coco-scale estimate": run_rule(*synthetic_coco(Path(tmp))),
        }
    (OUT / "selection.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, counts in result.items():
        for handling in HANDLINGS:
            c = counts[handling]
            lights = c["unrelabelled_lights"] or {}
            print(
                f"{name:20s} {handling:13s} selected {c['selected']:6d} {c['by_origin']}  "
                f"train {c['split']['train']['images']:6d} val {c['split']['val']['images']:5d}  "
                f"lights left out {lights.get('images_left_out')} {lights.get('images')} "
                f"ignore regions {lights.get('ignore_regions')}"
            )


if __name__ == "__main__":
    main()
