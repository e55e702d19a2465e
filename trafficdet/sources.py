"""Bring-your-own datasets: a local COCO or PASCAL VOC folder read into one COCO dict.

Images keep their location as ``local_path`` (instead of ``coco_url``), relative to the
folder (``download.source_path``) so that the output is the same wherever the repository
is; the images stage links them into the image store and the rest of the pipeline is unchanged.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

from trafficdet.errors import PipelineError
from trafficdet.io import read_json

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def import_coco_folder(root: Path) -> dict[str, Any]:
    """Read ``root/labels.json`` with images under ``root/images/`` (or Model Maker's old ``data/``)."""
    labels = root / "labels.json"
    if not root.is_dir():
        raise PipelineError(f"{root}: dataset folder not found (params.yaml download.source_path)")
    data = read_json(labels)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise PipelineError(f"{labels}: not a COCO file (missing list '{key}')")
    image_dir = next((root / name for name in ("images", "data") if (root / name).is_dir()), None)
    if image_dir is None:
        raise PipelineError(f"{root}: no images/ (or data/) folder beside labels.json")
    for image in data["images"]:
        name = image.get("file_name") if isinstance(image, dict) else None
        if not isinstance(name, str):
            raise PipelineError(f"{labels}: image entry without a file_name string: {image!r:.200}")
        image["local_path"] = f"{image_dir.name}/{name}"
        missing = [key for key in ("width", "height") if not _positive(image.get(key))]
        if missing:  # many tools leave them out; the file is at hand
            image["width"], image["height"] = header_size(image_dir / name, f"{labels}: image {name!r} has no '{missing[0]}'")
    return data


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def header_size(path: Path, problem: str) -> tuple[int, int]:
    """(width, height) from an image file's header: Pillow reads it without decoding the pixels."""
    try:
        with PILImage.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise PipelineError(f"{problem}, and {path} to read it from is missing") from None
    except Exception as err:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError... for bad files
        raise PipelineError(f"{problem}, and {path} does not tell it ({type(err).__name__})") from None


def _voc_int(node: ET.Element | None, tag: str, xml_path: Path) -> float:
    found = node.find(tag) if node is not None else None
    try:
        return float(found.text)  # type: ignore[union-attr, arg-type]
    except (AttributeError, TypeError, ValueError):
        raise PipelineError(f"{xml_path}: missing or non-numeric <{tag}>") from None


def _unset(size: ET.Element | None, tag: str) -> bool:
    """A <size> field left out, empty or 0 (a non-numeric one is an error, from ``_voc_int``)."""
    text = size.findtext(tag) if size is not None else None
    return text is None or text.strip() in ("", "0", "0.0")


def import_voc_folder(root: Path) -> dict[str, Any]:
    """Convert ``root/Annotations/*.xml`` + ``root/JPEGImages/`` to COCO (ids 1..N by class name)."""
    ann_dir, image_dir = root / "Annotations", root / "JPEGImages"
    if not ann_dir.is_dir() or not image_dir.is_dir():
        raise PipelineError(f"{root}: a PASCAL VOC folder needs Annotations/ and JPEGImages/")
    images, raw_objects = [], []
    for image_id, xml_path in enumerate(sorted(ann_dir.glob("*.xml")), start=1):
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as err:
            raise PipelineError(f"{xml_path}: not valid XML ({err})") from None
        file_name = (tree.findtext("filename") or f"{xml_path.stem}.jpg").strip()
        size = tree.find("size")
        given = [None if _unset(size, tag) else int(_voc_int(size, tag, xml_path)) for tag in ("width", "height")]
        if None in given:  # labelling tools often write no <size>, or 0 x 0: the image file is at hand
            given = list(header_size(image_dir / file_name, f"{xml_path}: no <size> with a positive <width> and <height>"))
        width, height = given
        local_path = f"{image_dir.name}/{file_name}"
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height, "local_path": local_path})
        for obj in tree.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if not name:
                raise PipelineError(f"{xml_path}: <object> without <name>")
            box = obj.find("bndbox")
            xmin, ymin = _voc_int(box, "xmin", xml_path), _voc_int(box, "ymin", xml_path)
            xmax, ymax = _voc_int(box, "xmax", xml_path), _voc_int(box, "ymax", xml_path)
            crowd = obj.findtext("difficult") == "1"
            raw_objects.append((image_id, name, [xmin, ymin, xmax - xmin, ymax - ymin], crowd))
    if not images:
        raise PipelineError(f"{ann_dir}: no .xml annotation files")
    names = sorted({name for _, name, _, _ in raw_objects})
    ids = {name: index for index, name in enumerate(names, start=1)}
    annotations = [
        {"id": n, "image_id": image_id, "category_id": ids[name], "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": int(crowd)}
        for n, (image_id, name, bbox, crowd) in enumerate(raw_objects, start=1)
    ]
    return {"images": images, "annotations": annotations, "categories": [{"id": ids[name], "name": name} for name in names]}
