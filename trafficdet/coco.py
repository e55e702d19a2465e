"""Reading COCO annotation files fast (only the fields the pipeline uses, segmentations skipped); cleaning boxes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from trafficdet.errors import PipelineError


class Image(msgspec.Struct):
    id: int
    file_name: str
    width: int | None = None  # required (load_pool): boxes are placed and clipped by them
    height: int | None = None
    coco_url: str | None = None
    local_path: str | None = None


class Annotation(msgspec.Struct):
    id: int
    image_id: int
    category_id: int
    bbox: Any = None  # checked by clean_box, so a bad box is counted rather than fatal
    iscrowd: int = 0
    area: Any = None  # COCO's segmentation area (what COCOeval's small/medium/large use); checked by the filter


class Category(msgspec.Struct):
    id: int
    name: str


class CocoFile(msgspec.Struct):
    """The fields the filter reads; msgspec skips the rest (segmentations are most of the bytes)."""

    images: list[Image]
    annotations: list[Annotation]
    categories: list[Category]


def read_coco(path: Path) -> CocoFile:
    """Decode a COCO file with msgspec: at COCO scale about 5x less memory and 3x less time
    than a full parse (BENCHMARKS.md), since segmentation polygons are skipped instead of
    built as Python floats."""
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=CocoFile)
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found") from None
    except msgspec.ValidationError as err:
        raise PipelineError(f"{path}: not a COCO annotation file ({err})") from None
    except msgspec.DecodeError as err:
        raise PipelineError(f"{path}: not valid JSON ({err})") from None


@dataclass
class Pool:
    """Every source image and box, from all annotation files."""

    images: dict[int, dict[str, Any]] = field(default_factory=dict)
    annotations: list[Annotation] = field(default_factory=list)
    categories: dict[int, str] = field(default_factory=dict)


def load_pool(files: list[Path]) -> Pool:
    """Read COCO files into one pool; image ids must be unique across files."""
    pool = Pool()
    origin_of: dict[int, Path] = {}
    for path in files:
        data = read_coco(path)
        origin = path.stem.removeprefix("instances_")
        for category in data.categories:
            known = pool.categories.setdefault(category.id, category.name)
            if known != category.name:
                raise PipelineError(f"{path}: category id {category.id} is {category.name!r} here but {known!r} elsewhere")
        for image in data.images:
            for name, value in (("width", image.width), ("height", image.height)):
                if value is None or value <= 0:
                    found = "missing" if value is None else f"{value}"
                    raise PipelineError(
                        f"{path}: image {image.id} ({image.file_name!r:.80}) has no '{name}' ({found}): every image needs "
                        "its width and height to place its boxes; add them to the file (for your own folder, "
                        "download.source: coco_folder reads them from the image files)"
                    )
            if image.id in origin_of:
                raise PipelineError(f"{path}: image id {image.id} also appears in {origin_of[image.id]}")
            origin_of[image.id] = path
            record = {key: value for key, value in msgspec.structs.asdict(image).items() if value is not None}
            record["origin"] = origin
            pool.images[image.id] = record
        pool.annotations.extend(data.annotations)
    return pool


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


def coco_area(ann: Annotation, box: list[float]) -> float:
    """COCO's own area (of the segmentation) when the source has one, else the box's: COCOeval's
    small/medium/large ranges use this field, so APs/APm/APl stay comparable with COCO's."""
    area = ann.area
    if isinstance(area, (int, float)) and not isinstance(area, bool) and math.isfinite(area) and area > 0:
        return float(area)
    return box[2] * box[3]
