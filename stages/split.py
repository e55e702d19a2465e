"""split: seeded train/validation split, as one COCO file per side.

Reads data/filtered/labels.json and data/images.json; writes
    data/split/{train,val}/labels.json   COCO files of each side (file names index data/images/)
    reports/split.json                   per-side, per-class image and box counts (DVC metrics)

Only label files: images stay in data/images/, so the split is a small cached output
that `dvc push`/`dvc pull` carry like any other (a folder of symlinks would not be).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from trafficdet.errors import PipelineError, run_stage
from trafficdet.io import atomic_dir, read_json, remove_stale_temps, write_json
from trafficdet.params import SplitParams, load
from trafficdet.paths import FILTERED_LABELS, IMAGE_INDEX, SIDES, SPLIT, SPLIT_REPORT


def stratified_split(classes_of: dict[int, set[int]], val_fraction: float, seed: int) -> set[int]:
    """Return the validation image ids, stratified by class presence.

    Hand-written (a dozen lines) instead of pulling in scikit-multilearn: each image
    is grouped by the rarest class it contains, and every group is split in
    proportion, so a rare class such as ``traffic_light_na`` lands on both sides.
    """
    frequency = Counter(cls for labels in classes_of.values() for cls in labels)
    groups: dict[int, list[int]] = defaultdict(list)
    for image_id in sorted(classes_of):
        labels = classes_of[image_id]
        rarest = min(labels, key=lambda cls: (frequency[cls], cls)) if labels else 0
        groups[rarest].append(image_id)
    rng = random.Random(seed)
    val: set[int] = set()
    for rarest in sorted(groups):
        members = groups[rarest]
        rng.shuffle(members)
        count = round(len(members) * val_fraction)
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        val.update(members[:count])
    return val


def split_dataset(
    coco: dict[str, Any], usable: set[str], method: str, val_fraction: float, seed: int
) -> tuple[dict[str, dict], dict]:
    """Return ({side: COCO dict}, report) for the usable images."""
    images = [image for image in coco["images"] if image["file_name"] in usable]
    classes_of: dict[int, set[int]] = {image["id"]: set() for image in images}
    for ann in coco["annotations"]:
        if ann["image_id"] in classes_of:
            classes_of[ann["image_id"]].add(ann["category_id"])
    if method == "published":
        published = {image["id"]: image["published_split"] for image in images if "published_split" in image}
        if not published:
            raise PipelineError("params.yaml split.method: published needs cocoTraffic's annotations (download.relabel_url)")
        rest = {i: c for i, c in classes_of.items() if i not in published}
        val = {i for i, side in published.items() if side == "val"} | stratified_split(rest, val_fraction, seed)
    else:
        val = stratified_split(classes_of, val_fraction, seed)
    sides: dict[str, dict] = {}
    report: dict[str, Any] = {"method": method}
    names = {category["id"]: category["name"] for category in coco["categories"]}
    for side in SIDES:
        chosen = [image for image in images if (image["id"] in val) == (side == "val")]
        ids = {image["id"] for image in chosen}
        anns = [ann for ann in coco["annotations"] if ann["image_id"] in ids]
        sides[side] = {
            "images": [{k: image[k] for k in ("id", "file_name", "width", "height")} for image in chosen],
            "annotations": anns,
            "categories": coco["categories"],
        }
        per_class_images = Counter(cls for image_id in ids for cls in classes_of[image_id])
        per_class_boxes = Counter(ann["category_id"] for ann in anns)
        report[side] = {
            "images": len(chosen),
            "annotations": len(anns),
            "classes": {names[c]: {"images": per_class_images[c], "annotations": per_class_boxes[c]} for c in sorted(names)},
        }
    if method == "published":
        report["outside_published_split"] = len(classes_of) - len(published)
    return sides, report


def write_split(sides: dict[str, dict], out: Path = SPLIT) -> None:
    """One ``<side>/labels.json`` per side, all or nothing."""
    with atomic_dir(out) as tmp:
        for side, coco in sides.items():
            write_json(tmp / side / "labels.json", coco)


def main() -> None:
    params = load(SplitParams)
    remove_stale_temps(SPLIT, SPLIT_REPORT)
    coco = read_json(FILTERED_LABELS)
    usable = set(read_json(IMAGE_INDEX)["kept"])
    sides, report = split_dataset(coco, usable, params.method, params.val_fraction, params.seed)
    for side in SIDES:
        if not sides[side]["images"]:
            raise PipelineError(f"split left no {side} images ({len(usable)} usable): lower split.val_fraction or add images")
    write_split(sides)
    write_json(SPLIT_REPORT, report, indent=True)
    print(f"split: {report['train']['images']} train / {report['val']['images']} val images")


if __name__ == "__main__":
    run_stage(main)
