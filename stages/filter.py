"""filter: pool the source annotations, apply the relabel overlay, keep the chosen classes.

Reads data/raw/annotations/*.json and data/raw/relabel/*.json; writes
    data/filtered/labels.json     COCO file, category ids remapped to 1..K in filter.classes order
    data/filtered/label_map.json  new id -> name and the source ids it came from
    reports/filter.json           per-class image/annotation counts and what was dropped (DVC metrics)
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from trafficdet.coco import Pool, load_pool, read_coco
from trafficdet.errors import PipelineError, run_stage
from trafficdet.io import remove_stale_temps, write_json
from trafficdet.params import FilterParams, load
from trafficdet.paths import FILTER_REPORT, FILTERED_LABELS, LABEL_MAP, RAW_ANNOTATIONS, RAW_RELABEL


def apply_relabel(pool: Pool, files: list[Path]) -> dict[str, int]:
    """Overwrite category ids by annotation id from cocoTraffic files; record its split.

    Files whose name contains ``train`` / ``val`` mark their images' ``published_split``.
    """
    new_category: dict[int, int] = {}
    for path in files:
        data = read_coco(path)
        for category in data.categories:
            pool.categories.setdefault(category.id, category.name)
        name = path.stem.lower()
        side = "train" if "train" in name else "val" if "val" in name else None
        for ann in data.annotations:
            new_category[ann.id] = ann.category_id
        if side:
            for image in data.images:
                if image.id in pool.images:
                    pool.images[image.id]["published_split"] = side
    changed = matched = 0
    for ann in pool.annotations:
        target = new_category.get(ann.id)
        if target is None:
            continue
        matched += 1
        if target != ann.category_id:
            ann.category_id = target
            changed += 1
    return {"relabelled": changed, "overlay_annotations": len(new_category), "overlay_unmatched": len(new_category) - matched}


def resolve_classes(pool: Pool, classes: list[str], overlay: bool) -> dict[int, int]:
    """Map source category ids to contiguous 1..K in ``classes`` order.

    Contiguous ids matter: Model Maker sizes its classifier by the number of
    categories but keeps raw ids, so an id like 92 would silently never train.
    """
    if not classes or len(set(classes)) != len(classes):
        raise PipelineError(f"params.yaml filter.classes: needs distinct class names, got {classes!r}")
    by_name: dict[str, list[int]] = defaultdict(list)
    for category_id, name in pool.categories.items():
        by_name[name].append(category_id)
    mapping = {}
    for new_id, name in enumerate(classes, start=1):
        if name not in by_name:
            hint = ""
            if name.startswith("traffic_light_") and not overlay:
                hint = " (the cocoTraffic overlay is off: set download.relabel_url, or use 'traffic light')"
            raise PipelineError(
                f"params.yaml filter.classes: {name!r} is not a category of the source annotations{hint}; "
                f"known: {', '.join(sorted(by_name))}"
            )
        for source_id in by_name[name]:
            mapping[source_id] = new_id
    return mapping


def clean_box(bbox: Any, width: float, height: float, min_side: float) -> tuple[list[float] | None, str]:
    """Clip a COCO xywh box to its image; return (box, "") or (None, reason)."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        return None, "malformed"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return None, "degenerate"
    x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return None, "outside_image"
    if x1 - x0 < min_side or y1 - y0 < min_side:
        return None, "too_small"
    clipped = [x0, y0, _fit(x0, x1 - x0, width), _fit(y0, y1 - y0, height)]
    return clipped, "clipped" if clipped != [x, y, w, h] else ""


def _fit(start: float, size: float, limit: float) -> float:
    """Shrink ``size`` by float ulps until ``start + size <= limit``.

    Model Maker silently skips a box whose right or bottom edge exceeds the image by
    even one rounding error, so the clipped box must fit exactly.
    """
    while start + size > limit:
        size = math.nextafter(size, 0.0)
    return size


def select_images(
    by_class: dict[int, list[int]], classes: list[str], include_all: list[str], images_per_class: int | str, seed: int
) -> tuple[set[int], dict[str, int]]:
    """The documented selection rule (see params.yaml filter:), seeded."""
    ids = {name: index for index, name in enumerate(classes, start=1)}
    unknown = [name for name in include_all if name not in ids]
    if unknown:
        raise PipelineError(f"params.yaml filter.include_all: {unknown} not in filter.classes")
    selected: set[int] = set()
    for name in include_all:
        selected.update(by_class[ids[name]])
    rng = random.Random(seed)
    added = {}
    for name in classes:
        if name in include_all:
            continue
        candidates = [image_id for image_id in by_class[ids[name]] if image_id not in selected]
        take = len(candidates) if images_per_class == "all" else min(images_per_class, len(candidates))
        chosen = rng.sample(candidates, take)
        selected.update(chosen)
        added[name] = take
    return selected, added


def filter_dataset(annotation_files: list[Path], relabel_files: list[Path], params: FilterParams) -> tuple[dict, list, dict]:
    """Return (COCO dict, label map, report) for the configured classes and selection rule."""
    pool = load_pool(annotation_files)
    overlay = apply_relabel(pool, relabel_files) if relabel_files else {}
    classes = params.classes
    mapping = resolve_classes(pool, classes, bool(relabel_files))
    min_side = params.min_box_side
    dropped: Counter[str] = Counter()
    kept: dict[int, list[tuple[int, int, list[float]]]] = defaultdict(list)  # image -> (ann id, new cat, box)
    drop_crowd = params.drop_crowd
    for ann in pool.annotations:
        new_id = mapping.get(ann.category_id)
        if new_id is None:
            dropped["other_class"] += 1
            continue
        image = pool.images.get(ann.image_id)
        if image is None:
            dropped["no_such_image"] += 1
            continue
        if ann.iscrowd and drop_crowd:
            dropped["crowd"] += 1
            continue
        box, reason = clean_box(ann.bbox, image["width"], image["height"], min_side)
        if box is None:
            dropped[reason] += 1
            continue
        if reason:
            dropped["clipped_kept"] += 1
        kept[ann.image_id].append((ann.id, new_id, box))
    by_class: dict[int, list[int]] = defaultdict(list)
    for image_id in sorted(kept):
        for class_id in sorted({cat for _, cat, _ in kept[image_id]}):
            by_class[class_id].append(image_id)
    selected, added = select_images(by_class, classes, params.include_all, params.images_per_class, params.seed)

    images, annotations = [], []
    seen_names: dict[str, int] = {}
    for image_id in sorted(selected):
        image = dict(pool.images[image_id])
        image["file_name"] = str(image["file_name"]).replace("/", "__")  # one flat image store
        if image["file_name"] in seen_names:
            raise PipelineError(f"images {seen_names[image['file_name']]} and {image_id} share file name {image['file_name']!r}")
        seen_names[image["file_name"]] = image_id
        images.append(image)
        for ann_id, new_id, (x, y, w, h) in kept[image_id]:
            annotations.append(
                {"id": ann_id, "image_id": image_id, "category_id": new_id, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            )
    categories = [{"id": index, "name": name} for index, name in enumerate(classes, start=1)]
    label_map = [
        {"id": index, "name": name, "source_ids": sorted(s for s, t in mapping.items() if t == index)}
        for index, name in enumerate(classes, start=1)
    ]
    per_class_ann = Counter(ann["category_id"] for ann in annotations)
    per_class_img = Counter(cat for image in selected for cat in {c for _, c, _ in kept[image]})
    report = {
        "images": len(images),
        "annotations": len(annotations),
        "source_images": len(pool.images),
        "source_annotations": len(pool.annotations),
        "classes": {
            name: {"images": per_class_img[i], "annotations": per_class_ann[i]} for i, name in enumerate(classes, start=1)
        },
        "dropped": {
            reason: dropped[reason]
            for reason in ("other_class", "crowd", "malformed", "degenerate", "outside_image", "too_small", "no_such_image")
        },
        "clipped_kept": dropped["clipped_kept"],
        "added_per_class": added,
        **({"overlay": overlay} if overlay else {}),
    }
    return {"images": images, "annotations": annotations, "categories": categories}, label_map, report


def relabel_files(relabel_dir: Path = RAW_RELABEL) -> list[Path]:
    return sorted(p for p in relabel_dir.glob("*.json") if p.name != "manifest.json")


def main() -> None:
    params = load(FilterParams)
    remove_stale_temps(FILTERED_LABELS, LABEL_MAP, FILTER_REPORT)
    files = sorted(p for p in RAW_ANNOTATIONS.glob("*.json") if p.name != "manifest.json")
    if not files:
        raise PipelineError(f"{RAW_ANNOTATIONS}: no annotation files; run the download stage first")
    coco, label_map, report = filter_dataset(files, relabel_files(), params)
    if not coco["images"]:
        raise PipelineError("filter kept no images: check filter.classes against the source categories")
    write_json(FILTERED_LABELS, coco)
    write_json(LABEL_MAP, label_map, indent=True)
    write_json(FILTER_REPORT, report, indent=True)
    print(f"filter: kept {report['images']} images, {report['annotations']} boxes; dropped {report['dropped']}")


if __name__ == "__main__":
    run_stage(main)
