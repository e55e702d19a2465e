"""filter: pool the source annotations, apply the relabel overlay, keep the chosen classes.

Reads data/raw/annotations/*.json and data/raw/relabel/*.json; writes
    data/filtered/labels.json     COCO file, category ids remapped to 1..K in filter.classes order;
                                  crowd regions kept (iscrowd 1), COCO's area kept; images keep
                                  their origin (train2017, val2017, own) for the split
    data/filtered/label_map.json  new id -> name and the source ids it came from
    reports/filter.json           per-class counts, the selection, what was dropped or left out (DVC metrics)
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, NamedTuple

from trafficdet.coco import Pool, clean_box, coco_area, load_pool
from trafficdet.errors import PipelineError, run_stage
from trafficdet.io import remove_stale_temps, write_json
from trafficdet.overlay import COCO_LIGHT, Overlay, apply_relabel, coco_light_ids, watched_lights
from trafficdet.params import FilterParams, load
from trafficdet.paths import FILTER_REPORT, FILTERED_LABELS, LABEL_MAP, RAW_ANNOTATIONS, RAW_RELABEL

__all__ = ["clean_box", "filter_dataset", "relabel_files"]  # clean_box: tested here, where the filter uses it
EXTRA_LIGHT_CLASS = "traffic_light"  # filter.unrelabelled_lights: traffic_light (COCO's own class is "traffic light")
UNRELABELLED = ("mislabelled", "outside_overlay")
DROP_REASONS = ("other_class", "unrelabelled_light", "malformed", "degenerate", "outside_image", "too_small", "no_such_image")


class Box(NamedTuple):
    ann_id: int
    class_id: int
    bbox: list[float]
    area: float
    crowd: bool


def resolve_classes(pool: Pool, classes: list[str], overlay: Overlay | None) -> dict[int, int]:
    """Map source category ids to contiguous 1..K in ``classes`` order.

    Contiguous ids matter: Model Maker sizes its classifier by the number of
    categories but keeps raw ids, so an id like 92 would silently never train.
    COCO's ``traffic light`` means every light, whatever colour the overlay gave it: with the
    overlay on it takes the colour ids too (the same boxes as with the overlay off), so it
    cannot be chosen together with a colour class.
    """
    if not classes or len(set(classes)) != len(classes):
        raise PipelineError(f"params.yaml filter.classes: needs distinct class names, got {classes!r}")
    by_name: dict[str, list[int]] = defaultdict(list)
    for category_id, name in pool.categories.items():
        by_name[name].append(category_id)
    if overlay is not None and COCO_LIGHT in classes:
        colours = sorted({pool.categories[source] for source in overlay.categories} & set(classes))
        if colours:
            raise PipelineError(
                f"params.yaml filter.classes: {COCO_LIGHT!r} (every traffic light, whatever its colour) and the colour "
                f"classes {', '.join(colours)} hold the same boxes: choose {COCO_LIGHT!r} or the colours, not both"
            )
        by_name[COCO_LIGHT] = sorted(coco_light_ids(pool) | overlay.categories)
    mapping = {}
    for new_id, name in enumerate(classes, start=1):
        if name not in by_name:
            hint = ""
            if name.startswith("traffic_light_") and overlay is None:
                hint = " (the cocoTraffic overlay is off: set download.relabel_url, or use 'traffic light')"
            if name == EXTRA_LIGHT_CLASS and overlay is not None:
                hint = " (it is added after filter.classes by filter.unrelabelled_lights: traffic_light)"
            raise PipelineError(
                f"params.yaml filter.classes: {name!r} is not a category of the source annotations{hint}; "
                f"known: {', '.join(sorted(by_name))}"
            )
        for source_id in by_name[name]:
            mapping[source_id] = new_id
    return mapping


def select_images(
    by_class: dict[int, list[int]],
    classes: list[str],
    include_all: list[str],
    images_per_class: int | str,
    seed: int,
    kept_all: set[int] | None = None,
) -> tuple[set[int], dict[str, Any]]:
    """The documented selection rule (see params.yaml filter:), seeded; ``kept_all`` comes first."""
    ids = {name: index for index, name in enumerate(classes, start=1)}
    unknown = [name for name in include_all if name not in ids]
    if unknown:
        raise PipelineError(f"params.yaml filter.include_all: {unknown} not in filter.classes")
    selected: set[int] = set(kept_all or ())
    for name in include_all:
        selected.update(by_class[ids[name]])
    included = len(selected) - len(kept_all or ())
    rng = random.Random(seed)
    added = {}
    for name in classes:
        if name in include_all:
            continue
        candidates = [image_id for image_id in by_class[ids[name]] if image_id not in selected]
        take = len(candidates) if images_per_class == "all" else min(images_per_class, len(candidates))
        selected.update(rng.sample(candidates, take))
        added[name] = take
    return selected, {"include_all": included, "added_per_class": added}


def filter_dataset(annotation_files: list[Path], relabel_files: list[Path], params: FilterParams) -> tuple[dict, list, dict]:
    """Return (COCO dict, label map, report) for the configured classes and selection rule."""
    pool = load_pool(annotation_files)
    overlay = apply_relabel(pool, relabel_files) if relabel_files else None
    classes, include_all = list(params.classes), list(params.include_all)
    mapping = resolve_classes(pool, classes, overlay)
    lights = watched_lights(pool, mapping, overlay)
    handling = params.unrelabelled_lights
    exclude_lights = handling == "exclude"
    # filter.unrelabelled_lights: ignore makes each such light an ignore region (iscrowd 1) of every chosen
    # colour class: COCOeval matches a crowd region only with detections of its own class.
    colour_ids = sorted({new_id for source, new_id in mapping.items() if overlay and source in overlay.categories})
    if lights and handling == "traffic_light":
        assert overlay is not None  # lights are watched only with the overlay on
        colours = {classes[new_id - 1] for new_id in colour_ids}
        classes.append(EXTRA_LIGHT_CLASS)
        mapping.update(dict.fromkeys(lights, len(classes)))
        if colours & set(include_all):
            include_all.append(EXTRA_LIGHT_CLASS)  # kept like the other light images
    next_id = max((ann.id for ann in pool.annotations), default=0) + 1  # ids for the extra copies of an ignore region

    dropped: Counter[str] = Counter()
    unrelabelled: dict[str, set[int]] = {reason: set() for reason in UNRELABELLED}
    kept: dict[int, list[Box]] = defaultdict(list)
    ignore_regions: set[int] = set()  # the source ids of the lights made ignore regions
    for ann in pool.annotations:
        light = ann.category_id in lights
        new_id = mapping.get(ann.category_id)
        if new_id is None and not light:
            dropped["other_class"] += 1
            continue
        image = pool.images.get(ann.image_id)
        if image is None:
            dropped["no_such_image"] += 1
            continue
        box, reason = clean_box(ann.bbox, image["width"], image["height"], params.min_box_side)
        if box is None:
            dropped[reason] += 1
            continue
        if light:
            assert overlay is not None
            unrelabelled[overlay.unrelabelled_reason(ann.id)].add(ann.image_id)
            if exclude_lights:
                dropped["unrelabelled_light"] += 1
                continue
        if reason:
            dropped["clipped_kept"] += 1
        if light and handling == "ignore":
            ignore_regions.add(ann.id)
            for index, class_id in enumerate(colour_ids):
                region_id = ann.id
                if index:
                    region_id, next_id = next_id, next_id + 1
                kept[ann.image_id].append(Box(region_id, class_id, box, coco_area(ann, box), True))
            continue
        kept[ann.image_id].append(Box(ann.id, mapping[ann.category_id], box, coco_area(ann, box), bool(ann.iscrowd)))

    left_out = set().union(*unrelabelled.values()) if exclude_lights else set()
    by_class: dict[int, list[int]] = defaultdict(list)  # crowds alone do not make an image hold a class
    for image_id in sorted(set(kept) - left_out):
        for class_id in sorted({b.class_id for b in kept[image_id] if not b.crowd}):
            by_class[class_id].append(image_id)
    candidates = {image_id for members in by_class.values() for image_id in members}
    kept_all = {image_id for image_id in candidates if pool.images[image_id].get("origin") in params.keep_all_from}
    selected, selection = select_images(by_class, classes, include_all, params.images_per_class, params.seed, kept_all)

    images, annotations = [], []
    seen_names: dict[str, int] = {}
    for image_id in sorted(selected):
        image = dict(pool.images[image_id])
        image["file_name"] = str(image["file_name"]).replace("/", "__")  # one flat image store
        if image["file_name"] in seen_names:
            raise PipelineError(f"images {seen_names[image['file_name']]} and {image_id} share file name {image['file_name']!r}")
        seen_names[image["file_name"]] = image_id
        images.append(image)
        for b in kept[image_id]:
            annotations.append(
                {
                    "id": b.ann_id,
                    "image_id": image_id,
                    "category_id": b.class_id,
                    "bbox": b.bbox,
                    "area": b.area,
                    "iscrowd": int(b.crowd),
                }
            )
    categories = [{"id": index, "name": name} for index, name in enumerate(classes, start=1)]
    label_map = [
        {"id": index, "name": name, "source_ids": sorted(s for s, t in mapping.items() if t == index)}
        for index, name in enumerate(classes, start=1)
    ]
    report = {
        "images": len(images),
        "annotations": len(annotations),
        "crowd_regions": sum(ann["iscrowd"] for ann in annotations),
        "source_images": len(pool.images),
        "source_annotations": len(pool.annotations),
        "origins": origin_counts(pool, selected),
        "classes": class_counts(classes, annotations),
        "selection": {"keep_all_from": origin_counts(pool, kept_all, params.keep_all_from), **selection},
        "dropped": {reason: dropped[reason] for reason in DROP_REASONS},
        "clipped_kept": dropped["clipped_kept"],
        **({"overlay": overlay.report} if overlay else {}),
    }
    if lights:
        report["unrelabelled_lights"] = {
            "handling": handling,
            "images": {reason: len(unrelabelled[reason]) for reason in UNRELABELLED},
            "images_left_out": len(left_out),
            # lights in the selection made ignore regions (one per colour class each)
            "ignore_regions": sum(1 for ann in annotations if ann["id"] in ignore_regions),
        }
    return {"images": images, "annotations": annotations, "categories": categories}, label_map, report


def origin_counts(pool: Pool, image_ids: set[int], origins: list[str] | None = None) -> dict[str, int]:
    """Images per origin (train2017, val2017, own), for ``origins`` or every origin present."""
    counts = Counter(str(pool.images[image_id].get("origin")) for image_id in image_ids)
    return {origin: counts[origin] for origin in (origins if origins is not None else sorted(counts))}


def class_counts(classes: list[str], annotations: list[dict]) -> dict[str, dict[str, int]]:
    """Per class: images holding it and its boxes (crowd regions apart: ignored in training and evaluation)."""
    boxes = Counter(ann["category_id"] for ann in annotations if not ann["iscrowd"])
    crowds = Counter(ann["category_id"] for ann in annotations if ann["iscrowd"])
    images = Counter(cat for image, cat in {(a["image_id"], a["category_id"]) for a in annotations if not a["iscrowd"]})
    return {name: {"images": images[i], "annotations": boxes[i], "crowd_regions": crowds[i]} for i, name in enumerate(classes, 1)}


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
    print(
        f"filter: kept {report['images']} images {report['origins']}, {report['annotations']} boxes; dropped {report['dropped']}"
    )
    lights = report.get("unrelabelled_lights")
    if lights and lights["images_left_out"]:
        counts = lights["images"]
        print(
            f"filter: left out {lights['images_left_out']} images holding traffic lights the overlay did not relabel "
            f"({counts['mislabelled']} with mislabelled ones, {counts['outside_overlay']} outside the overlay); "
            "filter.unrelabelled_lights: ignore keeps them as ignore regions, traffic_light as one more class"
        )


if __name__ == "__main__":
    run_stage(main)
