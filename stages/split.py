"""split: seeded train/validation split, as one COCO file per side.

Reads data/filtered/labels.json and data/images.json; writes
    data/split/{train,val}/labels.json   COCO files of each side (file names index data/images/; images keep
                                         their origin, crowd regions their iscrowd: 1)
    reports/split.json                   the protocol, per-side origins and per-class image and box counts (DVC metrics)

split.method: coco (COCO 2017's own train2017/val2017 assignment), stratified (trafficdet/stratify.py)
or published (cocoTraffic's split).

Only label files: images stay in data/images/, so the split is a small cached output
that `dvc push`/`dvc pull` carry like any other (a folder of symlinks would not be).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from trafficdet.errors import PipelineError, run_stage
from trafficdet.io import atomic_dir, read_json, remove_stale_temps, write_json
from trafficdet.params import SplitParams, load
from trafficdet.paths import FILTERED_LABELS, IMAGE_INDEX, SIDES, SPLIT, SPLIT_REPORT
from trafficdet.stratify import stratified_split

COCO_POOLS = ("train2017", "val2017")
PROTOCOLS = {
    "coco": (
        "COCO 2017's own assignment: train2017 images train, val2017 images validate. A checkpoint trained on "
        "COCO train2017 never saw a validation image; AP follows COCO's val2017 protocol on these classes."
    ),
    "stratified": (
        "Seeded stratified split of the selection: round(N x val_fraction) validation images (half up, at least 1, "
        "at most N-1), every class with two or more images on both sides where the count allows."
    ),
    "published": (
        "cocoTraffic's published 80/20 split (its train and val files each hold train2017 and val2017 images); "
        "images it does not cover are split stratified."
    ),
}


def coco_split(images: list[dict[str, Any]]) -> set[int]:
    """COCO's own assignment: the val2017 images validate, the train2017 images train."""
    origins = Counter(str(image.get("origin")) for image in images)
    others = {origin: count for origin, count in origins.items() if origin not in COCO_POOLS}
    if others:
        mine = " (your own dataset)" if set(others) == {"own"} else ""
        raise PipelineError(
            f"params.yaml split.method: coco follows COCO 2017's train2017/val2017 assignment, but "
            f"{sum(others.values())} images come from {', '.join(sorted(others))}{mine}: set split.method: stratified"
        )
    if not origins["val2017"]:
        raise PipelineError(
            "params.yaml split.method: coco validates on val2017 images, and the selection holds none: "
            "set filter.keep_all_from: [val2017]"
        )
    if not origins["train2017"]:
        raise PipelineError("params.yaml split.method: coco trains on train2017 images, and the selection holds none")
    return {image["id"] for image in images if image.get("origin") == "val2017"}


def split_dataset(
    coco: dict[str, Any], usable: set[str], method: str, val_fraction: float, seed: int
) -> tuple[dict[str, dict], dict]:
    """Return ({side: COCO dict}, report) for the usable images."""
    images = [image for image in coco["images"] if image["file_name"] in usable]
    if len(images) < 2:
        raise PipelineError(
            f"split: {len(images)} usable image(s); a train/validation split needs at least 2: add images "
            f"(see {IMAGE_INDEX} for rejected ones, reports/filter.json for the selection)"
        )
    classes_of: dict[int, set[int]] = {image["id"]: set() for image in images}
    for ann in coco["annotations"]:
        if ann["image_id"] in classes_of and not ann.get("iscrowd"):  # a crowd region is an ignore region, no class
            classes_of[ann["image_id"]].add(ann["category_id"])
    if method == "coco":
        val = coco_split(images)
    elif method == "published":
        published = {image["id"]: image["published_split"] for image in images if "published_split" in image}
        if not published:
            raise PipelineError("params.yaml split.method: published needs cocoTraffic's annotations (download.relabel_url)")
        rest = {i: c for i, c in classes_of.items() if i not in published}
        val = {i for i, side in published.items() if side == "val"} | stratified_split(rest, val_fraction, seed)
    else:
        val = stratified_split(classes_of, val_fraction, seed)
    sides: dict[str, dict] = {}
    names = {category["id"]: category["name"] for category in coco["categories"]}
    report: dict[str, Any] = {"method": method, "protocol": PROTOCOLS[method]}
    for side in SIDES:
        chosen = [image for image in images if (image["id"] in val) == (side == "val")]
        ids = {image["id"] for image in chosen}
        anns = [ann for ann in coco["annotations"] if ann["image_id"] in ids]
        sides[side] = {
            "images": [{k: image[k] for k in ("id", "file_name", "width", "height", "origin") if k in image} for image in chosen],
            "annotations": anns,
            "categories": coco["categories"],
        }
        per_class_images = Counter(cls for image_id in ids for cls in classes_of[image_id])
        per_class_boxes = Counter(ann["category_id"] for ann in anns if not ann.get("iscrowd"))
        report[side] = {
            "images": len(chosen),
            "annotations": sum(per_class_boxes.values()),
            "crowd_regions": sum(1 for ann in anns if ann.get("iscrowd")),
            "origins": dict(sorted(Counter(str(image.get("origin")) for image in chosen).items())),
            "classes": {names[c]: {"images": per_class_images[c], "annotations": per_class_boxes[c]} for c in sorted(names)},
        }
    report["val_images_from_train2017"] = report["val"]["origins"].get("train2017", 0)
    report["one_side_only"] = {
        name: side
        for name in names.values()
        for side, other in (("train", "val"), ("val", "train"))
        if report[side]["classes"][name]["images"] and not report[other]["classes"][name]["images"]
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
    write_split(sides)
    write_json(SPLIT_REPORT, report, indent=True)
    print(f"split: {report['train']['images']} train / {report['val']['images']} val images ({params.method})")
    if report["one_side_only"]:
        print(f"split: classes on one side only (too few images): {report['one_side_only']}")


if __name__ == "__main__":
    run_stage(main)
