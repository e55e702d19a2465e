"""The cocoTraffic relabel overlay (github daved01/cocoTraffic, ``api/make_datasets.py``).

cocoTraffic split COCO's ``traffic light`` (id 10) into ``traffic_light_red`` (92),
``traffic_light_green`` (93) and ``traffic_light_na`` (94) in the images of its "COCO Traffic"
set, and left the lights it found mislabelled at 10. Its files are merged by annotation id.
Their names say which side of its own 80/20 split (over train2017 and val2017 images alike)
their images are on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trafficdet.coco import Pool, read_coco

COCO_LIGHT = "traffic light"  # COCO 2017's category 10, which cocoTraffic splits by colour


@dataclass
class Overlay:
    """What the cocoTraffic files hold: their annotation ids, and the categories only they define (92/93/94)."""

    annotation_ids: set[int] = field(default_factory=set)
    categories: set[int] = field(default_factory=set)
    report: dict[str, int] = field(default_factory=dict)

    def unrelabelled_reason(self, ann_id: int) -> str:
        """Why a box still carries COCO's light id: cocoTraffic kept it at 10, or never saw it."""
        return "mislabelled" if ann_id in self.annotation_ids else "outside_overlay"


def published_side(path: Path) -> str | None:
    """cocoTraffic's split of a file, from its name.

    Its final files are ``instances_train_traffic.json`` / ``instances_val_traffic.json``, its
    intermediate ones ``instances_trainTraffic.json`` / ``instances_valTraffic.json``.
    """
    name = path.stem.lower().removeprefix("instances_")
    for side in ("train", "val"):
        if name.startswith(side):
            return side
    return "train" if "train" in name else "val" if "val" in name else None


def apply_relabel(pool: Pool, files: list[Path]) -> Overlay:
    """Overwrite category ids by annotation id from cocoTraffic files; record its split as ``published_split``."""
    source_categories = set(pool.categories)
    overlay = Overlay()
    new_category: dict[int, int] = {}
    for path in files:
        data = read_coco(path)
        for category in data.categories:
            pool.categories.setdefault(category.id, category.name)
            if category.id not in source_categories:
                overlay.categories.add(category.id)
        side = published_side(path)
        for ann in data.annotations:
            new_category[ann.id] = ann.category_id
        if side:
            for image in data.images:
                if image.id in pool.images:
                    pool.images[image.id]["published_split"] = side
    overlay.annotation_ids = set(new_category)
    changed = matched = 0
    for ann in pool.annotations:
        target = new_category.get(ann.id)
        if target is None:
            continue
        matched += 1
        if target != ann.category_id:
            ann.category_id = target
            changed += 1
    overlay.report = {
        "relabelled": changed,
        "overlay_annotations": len(new_category),
        "overlay_unmatched": len(new_category) - matched,
    }
    return overlay


def coco_light_ids(pool: Pool) -> set[int]:
    """The ids named COCO's ``traffic light`` (10 in COCO 2017)."""
    return {cid for cid, name in pool.categories.items() if name == COCO_LIGHT}


def watched_lights(pool: Pool, mapping: dict[int, int], overlay: Overlay | None) -> set[int]:
    """COCO's ``traffic light`` ids whose boxes must not become background.

    That is when colour classes from the overlay are chosen (``traffic light`` itself then
    cannot be, see ``filter.resolve_classes``): a light the overlay left at 10 would otherwise
    be dropped while its image is kept.
    """
    if overlay is None or not any(source in overlay.categories for source in mapping):
        return set()
    return {cid for cid in coco_light_ids(pool) if cid not in mapping}
