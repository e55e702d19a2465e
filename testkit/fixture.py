"""Seeded synthetic traffic scenes laid out exactly like the real download sources.

Tests and the offline demo serve this tree on 127.0.0.1 (``fixture_server``) and point
``download.mirror`` / ``download.relabel_url`` / ``download.checkpoint_url`` at it, so
the real download, filter and split code runs with no network.

Layout (paths as under the real hosts):
    annotations/annotations_trainval2017.zip   COCO 2017 annotations (instances + captions)
    train2017/<id>.jpg, val2017/<id>.jpg       one file per image, as ``coco_url`` names it
    zips/train2017.zip, zips/val2017.zip       the reference workflow's image zips
    drive/02_coco_traffic.zip                  cocoTraffic-style relabel (lights -> 92/93/94), with its
                                               gaps: lights it kept at 10 ("mislabelled") and
                                               train2017 images it does not cover
    tf_model_garden/.../<arch>_ckpt.tar.gz     checkpoint tarball with one root folder
    fixture.json                               checksums and counts of the above
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import random
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from trafficdet.io import write_json

# Real COCO 2017 ids for the classes the scenes draw, plus two the filter must drop.
COCO_CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 2, "name": "bicycle", "supercategory": "vehicle"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 4, "name": "motorcycle", "supercategory": "vehicle"},
    {"id": 6, "name": "bus", "supercategory": "vehicle"},
    {"id": 8, "name": "truck", "supercategory": "vehicle"},
    {"id": 10, "name": "traffic light", "supercategory": "outdoor"},
    {"id": 13, "name": "stop sign", "supercategory": "outdoor"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]
RELABEL_CATEGORIES = [
    {"id": 92, "name": "traffic_light_red", "supercategory": "outdoor"},
    {"id": 93, "name": "traffic_light_green", "supercategory": "outdoor"},
    {"id": 94, "name": "traffic_light_na", "supercategory": "outdoor"},
]
LAMP_TO_RELABEL = {"red": 92, "green": 93, "dark": 94}
COCO_IMAGE_ROOT = "http://images.cocodataset.org"
ANNOTATIONS_ZIP = "annotations/annotations_trainval2017.zip"
RELABEL_ZIP = "drive/02_coco_traffic.zip"
CHECKPOINT_TARBALL = "tf_model_garden/vision/qat/mobilenetv3.5_ssd_coco/mobilenetv3.5_ssd_i256_ckpt.tar.gz"


@dataclass
class Scene:
    """One synthetic image and its COCO annotations (bbox in pixels, xywh)."""

    image: Image.Image
    objects: list[tuple[int, list[float], str]]  # (coco category id, bbox, lamp state or "")


def _vehicle(draw: ImageDraw.ImageDraw, rng: random.Random, kind: str, x: int, ground: int) -> list[float]:
    sizes = {"car": (46, 80, 24, 34), "truck": (80, 115, 46, 62), "bus": (105, 150, 44, 56)}
    wmin, wmax, hmin, hmax = sizes[kind]
    w, h = rng.randint(wmin, wmax), rng.randint(hmin, hmax)
    y = ground - h
    body = {
        "car": (rng.randint(30, 230), rng.randint(30, 230), rng.randint(30, 230)),
        "truck": (rng.randint(150, 230), rng.randint(150, 230), rng.randint(150, 230)),
        "bus": rng.choice([(230, 190, 20), (200, 40, 40), (40, 90, 200)]),
    }[kind]
    wheel_r = max(4, h // 6)
    if kind == "car":
        draw.rectangle([x, y + h // 3, x + w, y + h - wheel_r], fill=body)
        draw.polygon([(x + w // 5, y + h // 3), (x + w // 3, y), (x + 2 * w // 3, y), (x + 4 * w // 5, y + h // 3)], fill=body)
        draw.rectangle([x + w // 3 + 2, y + 3, x + 2 * w // 3 - 2, y + h // 3], fill=(160, 200, 230))
    elif kind == "truck":
        cab = w // 4
        draw.rectangle([x, y, x + w - cab - 2, y + h - wheel_r], fill=body)
        draw.rectangle([x + w - cab, y + h // 3, x + w, y + h - wheel_r], fill=(rng.randint(20, 120),) * 3)
        draw.rectangle([x + w - cab + 3, y + h // 3 + 3, x + w - 3, y + h // 2], fill=(160, 200, 230))
    else:
        draw.rectangle([x, y, x + w, y + h - wheel_r], fill=body)
        for wx in range(x + 6, x + w - 14, 16):
            draw.rectangle([wx, y + 6, wx + 11, y + h // 2], fill=(160, 200, 230))
    for cx in (x + w // 5, x + 4 * w // 5):
        draw.ellipse([cx - wheel_r, ground - 2 * wheel_r, cx + wheel_r, ground], fill=(15, 15, 15))
    return [float(x), float(y), float(w), float(h)]


def _person(draw: ImageDraw.ImageDraw, rng: random.Random, x: int, ground: int) -> list[float]:
    h = rng.randint(30, 50)
    w = max(8, h // 3)
    y = ground - h
    skin = rng.choice([(240, 200, 170), (190, 140, 100), (120, 80, 50)])
    draw.ellipse([x + w // 4, y, x + 3 * w // 4, y + h // 5], fill=skin)
    draw.rectangle([x, y + h // 5, x + w, y + 3 * h // 5], fill=(rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)))
    draw.rectangle([x + 1, y + 3 * h // 5, x + w - 1, y + h], fill=(30, 30, 80))
    return [float(x), float(y), float(w), float(h)]


def _two_wheeler(draw: ImageDraw.ImageDraw, rng: random.Random, kind: str, x: int, ground: int) -> list[float]:
    w, h = (rng.randint(34, 46), rng.randint(22, 30)) if kind == "motorcycle" else (rng.randint(28, 36), rng.randint(18, 24))
    y = ground - h
    r = h // 3
    colour = (20, 20, 20) if kind == "motorcycle" else (200, 30, 30)
    for cx in (x + r, x + w - r):
        draw.ellipse([cx - r, ground - 2 * r, cx + r, ground], outline=colour, width=3)
    draw.line([x + r, ground - r, x + w // 2, y + 2, x + w - r, ground - r], fill=colour, width=4 if kind == "motorcycle" else 2)
    return [float(x), float(y), float(w), float(h)]


def _traffic_light(draw: ImageDraw.ImageDraw, rng: random.Random, x: int, top: int, lamp: str) -> list[float]:
    w, h = rng.randint(10, 16), rng.randint(26, 40)
    draw.rectangle([x + w // 2 - 1, top + h, x + w // 2 + 1, top + h + rng.randint(30, 60)], fill=(60, 60, 60))
    draw.rectangle([x, top, x + w, top + h], fill=(25, 25, 25))
    lamp_r = max(2, w // 2 - 2)
    colours = {
        "red": [(255, 30, 30), (50, 40, 10), (10, 50, 10)],
        "green": [(60, 10, 10), (50, 40, 10), (40, 255, 60)],
        "dark": [(60, 10, 10), (50, 40, 10), (10, 50, 10)],
    }[lamp]
    for i, colour in enumerate(colours):
        cy = top + (i + 1) * h // 4
        draw.ellipse([x + w // 2 - lamp_r, cy - lamp_r, x + w // 2 + lamp_r, cy + lamp_r], fill=colour)
    return [float(x), float(top), float(w), float(h)]


def make_scene(rng: random.Random, width: int = 320, height: int = 240) -> Scene:
    """Draw one street scene: sky, road, a few vehicles, lights and people."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    horizon = int(height * rng.uniform(0.35, 0.5))
    sky = (rng.randint(120, 190), rng.randint(160, 210), rng.randint(200, 255))
    draw.rectangle([0, 0, width, horizon], fill=sky)
    draw.rectangle([0, horizon, width, height], fill=(rng.randint(70, 110),) * 3)
    for lx in range(0, width, 40):
        draw.rectangle([lx, int(height * 0.8), lx + 20, int(height * 0.8) + 3], fill=(230, 230, 230))
    objects: list[tuple[int, list[float], str]] = []
    for _ in range(rng.randint(1, 3)):
        lamp = rng.choices(["red", "green", "dark"], weights=[4, 4, 1])[0]
        box = _traffic_light(draw, rng, rng.randint(0, width - 20), rng.randint(4, max(5, horizon - 45)), lamp)
        objects.append((10, box, lamp))
    ground = int(height * rng.uniform(0.78, 0.95))
    x = rng.randint(0, 30)
    while x < width - 40:
        kind = rng.choices(["car", "truck", "bus", "person", "motorcycle", "bicycle", "gap"], weights=[5, 2, 2, 3, 1, 1, 2])[0]
        if kind == "gap":
            x += rng.randint(10, 40)
            continue
        if kind in ("car", "truck", "bus"):
            box = _vehicle(draw, rng, kind, x, ground)
        elif kind == "person":
            box = _person(draw, rng, x, ground)
        else:
            box = _two_wheeler(draw, rng, kind, x, ground)
        if box[0] + box[2] > width:  # do not let shapes run off the right edge
            draw.rectangle([box[0], box[1], width, box[1] + box[3]], fill=(rng.randint(70, 110),) * 3)
            break
        cat = {"car": 3, "truck": 8, "bus": 6, "person": 1, "motorcycle": 4, "bicycle": 2}[kind]
        objects.append((cat, box, ""))
        x += int(box[2]) + rng.randint(4, 30)
    if rng.random() < 0.15:  # an out-of-scope class the filter should drop
        dx = rng.randint(0, width - 30)
        draw.ellipse([dx, ground - 18, dx + 26, ground], fill=(140, 90, 40))
        objects.append((18, [float(dx), float(ground - 18), 26.0, 18.0], ""))
    return Scene(image=image, objects=objects)


def _octagon(x: float, y: float, w: float, h: float) -> tuple[list[float], float]:
    """A COCO-style polygon inside the box (corners cut) and its area, which, as in COCO, is less than w x h."""
    c = 0.2 * min(w, h)
    points = [x + c, y, x + w - c, y, x + w, y + c, x + w, y + h - c, x + w - c, y + h, x + c, y + h, x, y + h - c, x, y + c]
    return points, w * h - 2 * c * c


def _crowd(image: Image.Image, rng: random.Random) -> tuple[list[float], dict[str, Any], float]:
    """Draw a tight group of people (a COCO crowd region): its box, RLE mask and mask area."""
    import numpy as np
    from pycocotools import mask as mask_util

    draw = ImageDraw.Draw(image)
    width, height = image.size
    ground = height - rng.randint(4, 12)
    x = rng.randint(0, width - 90)
    mask = np.zeros((height, width), dtype=np.uint8)
    for _ in range(rng.randint(4, 6)):
        px, py, pw, ph = (int(v) for v in _person(draw, rng, x, ground))
        mask[py : py + ph + 1, px : px + pw + 1] = 1
        x += rng.randint(6, 12)  # overlapping: one region, not separate people
    ys, xs = np.nonzero(mask)
    bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
    rle = mask_util.encode(np.asfortranarray(mask))
    return bbox, {"size": rle["size"], "counts": rle["counts"].decode()}, float(mask.sum())


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _md5(path: Path) -> str:
    return "md5:" + hashlib.md5(path.read_bytes()).hexdigest()


def _coco_file(images: list[dict], annotations: list[dict], categories: list[dict]) -> dict[str, Any]:
    return {
        "info": {"description": "synthetic traffic scenes (trafficdet fixture)", "year": 2017},
        "licenses": [{"id": 1, "name": "CC0", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _zip(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():  # a fixed date: every worker's fixture is the same bytes
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)


def _checkpoint_tarball(path: Path, rng: random.Random) -> None:
    """A tarball with one root folder, like Model Maker's checkpoint archives.

    The payload is random bytes under the real file names: enough for the download
    stage's verify-and-extract path; training from it is not expected to work.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.name.removesuffix(".tar.gz")
    files = {
        f"{root}/checkpoint": b'model_checkpoint_path: "ckpt-277200"\n',
        f"{root}/ckpt-277200.index": rng.randbytes(256),
        f"{root}/ckpt-277200.data-00000-of-00001": rng.randbytes(4096),
    }
    # gzip's header holds a time unless told: mtime=0 makes every worker's fixture the same bytes.
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def generate(
    root: Path,
    *,
    images: int = 60,
    seed: int = 0,
    width: int = 320,
    height: int = 240,
    val_every: int = 5,
    bad_boxes: bool = False,
    corrupt_images: int = 0,
) -> dict[str, Any]:
    """Write the fixture tree under ``root`` and return its manifest (also ``fixture.json``).

    ``bad_boxes`` adds a zero-width box, a box outside its image and one that runs
    slightly past the border; ``corrupt_images`` truncates that many served JPEGs.
    Every object's ``area`` is its polygon's, as in COCO (less than the box's). Like the real
    sources, some images hold a crowd region (``iscrowd: 1``, RLE mask), and the overlay has
    both kinds of gap: per 40 images, two train2017 images it does not cover at all
    (``outside``), and one light in a train2017 and one in a val2017 image it keeps at 10
    (``mislabelled``). The manifest's ``gaps`` lists them.
    """
    rng = random.Random(seed)
    crowd_rng = random.Random(seed + 2)  # separate, so the scenes stay those of earlier fixtures
    root = Path(root)
    splits: dict[str, tuple[list[dict], list[dict]]] = {"train2017": ([], []), "val2017": ([], [])}
    lamp_of: dict[int, str] = {}
    jpegs: dict[str, dict[str, bytes]] = {"train2017": {}, "val2017": {}}
    gaps: dict[str, list[int]] = {"outside_images": [], "mislabelled_annotations": [], "crowd_annotations": []}
    ann_id = 1000
    for index in range(images):
        image_id = 100 + index * 7  # non-contiguous ids, like COCO's
        split = "val2017" if index % val_every == val_every - 1 else "train2017"
        scene = make_scene(rng, width, height)
        crowd = _crowd(scene.image, crowd_rng) if index % 10 == 6 or index % 20 == 9 else None
        if split == "train2017" and index % 20 == 7:
            gaps["outside_images"].append(image_id)
        mislabelled = index % 40 in (11, 14)  # a train2017 and a val2017 image (with val_every 5)
        file_name = f"{image_id:012d}.jpg"
        data = _jpeg(scene.image)
        if index < corrupt_images:
            data = data[: len(data) // 3]
        jpegs[split][file_name] = data
        split_images, split_anns = splits[split]
        split_images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": width,
                "height": height,
                "license": 1,
                "coco_url": f"{COCO_IMAGE_ROOT}/{split}/{file_name}",
            }
        )
        for category_id, (x, y, w, h), lamp in scene.objects:
            ann_id += 1
            if lamp and mislabelled:
                gaps["mislabelled_annotations"].append(ann_id)
                mislabelled = False  # one per image
            elif lamp:
                lamp_of[ann_id] = lamp
            polygon, area = _octagon(x, y, w, h)
            split_anns.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [x, y, w, h],
                    "area": area,
                    "iscrowd": 0,
                    "segmentation": [polygon],
                }
            )
        if crowd:
            ann_id += 1
            bbox, rle, area = crowd
            gaps["crowd_annotations"].append(ann_id)
            crowd_ann = {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": bbox, "area": area, "iscrowd": 1}
            split_anns.append({**crowd_ann, "segmentation": rle})
    if bad_boxes:
        train_images, train_anns = splits["train2017"]
        first = train_images[0]["id"]
        for bbox in ([10.0, 10.0, 0.0, 20.0], [width + 5.0, 10.0, 20.0, 20.0], [width - 10.0, 10.0, 12.0, 20.0]):
            ann_id += 1
            train_anns.append(
                {
                    "id": ann_id,
                    "image_id": first,
                    "category_id": 3,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                    "segmentation": [],
                }
            )

    for split, files in jpegs.items():
        for file_name, data in files.items():
            out = root / split / file_name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        _zip(root / "zips" / f"{split}.zip", {f"{split}/{name}": data for name, data in files.items()})

    import orjson  # the fixture writes what the real zips hold: compact JSON

    members = {
        f"annotations/instances_{split}.json": orjson.dumps(_coco_file(imgs, anns, COCO_CATEGORIES))
        for split, (imgs, anns) in splits.items()
    }
    members["annotations/captions_train2017.json"] = b'{"annotations": []}'
    _zip(root / ANNOTATIONS_ZIP, members)

    # cocoTraffic: the train2017 images it covers with all their boxes, val2017's lights only (as its
    # make_datasets.py keeps them), lights relabelled by state but the mislabelled ones, and its own
    # 80/20 split of those images.
    outside = set(gaps["outside_images"])
    covered_anns = [ann for ann in splits["train2017"][1] if ann["image_id"] not in outside]
    covered_anns += [ann for ann in splits["val2017"][1] if ann["category_id"] == 10]
    covered = {ann["image_id"] for ann in covered_anns}
    all_images = [image for image in splits["train2017"][0] + splits["val2017"][0] if image["id"] in covered]
    order = sorted(image["id"] for image in all_images)
    random.Random(seed + 1).shuffle(order)
    published_val = set(order[: len(order) // 5])
    relabelled = [
        {**ann, "category_id": LAMP_TO_RELABEL[lamp_of[ann["id"]]]} if ann["id"] in lamp_of else ann for ann in covered_anns
    ]
    relabel_members = {}
    # The names its make_datasets.py saves COCO Traffic under (its intermediate ones: instances_trainTraffic.json).
    for name, keep in (("train_traffic", lambda i: i not in published_val), ("val_traffic", lambda i: i in published_val)):
        imgs = [image for image in all_images if keep(image["id"])]
        anns = [ann for ann in relabelled if keep(ann["image_id"])]
        relabel_members[f"02_coco_traffic/instances_{name}.json"] = orjson.dumps(
            _coco_file(imgs, anns, COCO_CATEGORIES + RELABEL_CATEGORIES)
        )
    _zip(root / RELABEL_ZIP, relabel_members)
    _checkpoint_tarball(root / CHECKPOINT_TARBALL, rng)

    manifest = {
        "images": images,
        "seed": seed,
        "annotations": sum(len(anns) for _, anns in splits.values()),
        "gaps": gaps,
        "checksums": {
            path: _md5(root / path)
            for path in (ANNOTATIONS_ZIP, RELABEL_ZIP, CHECKPOINT_TARBALL, "zips/train2017.zip", "zips/val2017.zip")
        },
    }
    write_json(root / "fixture.json", manifest, indent=True)
    return manifest


def write_video(path: Path, frames: int = 12, seed: int = 0, fps: float = 10.0, width: int = 320, height: int = 240) -> Path:
    """A short clip of one synthetic street, the camera panning along it (objects slide left), written
    with OpenCV: MJPEG for .avi, MPEG-4 part 2 otherwise. For `make predict` on video."""
    import cv2
    import numpy as np

    street = np.asarray(make_scene(random.Random(seed), 2 * width, height).image)  # twice the frame's width
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "MJPG" if path.suffix.lower() == ".avi" else "mp4v"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write {codec} video")
    for index in range(frames):
        left = round(index * width / max(1, frames - 1))
        writer.write(cv2.cvtColor(np.ascontiguousarray(street[:, left : left + width]), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def image_records(root: Path) -> list[dict[str, Any]]:
    """The COCO image records (with ``coco_url``) of a generated fixture, train then val."""
    import orjson

    with zipfile.ZipFile(Path(root) / ANNOTATIONS_ZIP) as zf:
        return [
            image
            for split in ("train2017", "val2017")
            for image in orjson.loads(zf.read(f"annotations/instances_{split}.json"))["images"]
        ]


def download_params(base_url: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The ``download:`` params that point the pipeline at a fixture served at ``base_url``."""
    sums = manifest["checksums"]
    return {
        "mirror": base_url,
        "annotations_checksum": sums[ANNOTATIONS_ZIP],
        "relabel_url": f"{base_url}/{RELABEL_ZIP}",
        "relabel_checksum": sums[RELABEL_ZIP],
        "pretrained": "mobilenet_multi_avg",  # the fixture's checkpoint is in Model Maker's layout for it
        "checkpoint_url": f"{base_url}/{CHECKPOINT_TARBALL}",
        "checkpoint_checksum": sums[CHECKPOINT_TARBALL],
        "train_zip_checksum": sums["zips/train2017.zip"],
        "val_zip_checksum": sums["zips/val2017.zip"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, nargs="?", help="where to write the source tree (optional with --video)")
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"))
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="where fixture_server will serve it")
    parser.add_argument("--video", type=Path, metavar="FILE", help="write a short clip of a synthetic street (.mp4, .avi)")
    args = parser.parse_args()
    if args.video:
        print(f"wrote {write_video(args.video, seed=args.seed, width=args.size[0], height=args.size[1])}")
    if args.root is None:
        if not args.video:
            parser.error("give the folder to write the source tree to (or --video FILE)")
        return
    manifest = generate(args.root, images=args.images, seed=args.seed, width=args.size[0], height=args.size[1])
    print(f"wrote {manifest['images']} images, {manifest['annotations']} annotations to {args.root}")
    flags = " ".join(f"-S download.{key}={value}" for key, value in download_params(args.url, manifest).items())
    print(f"serve it:  python -m testkit.fixture_server {args.root} --port {args.url.rsplit(':', 1)[-1]}")
    # The fixture's checkpoint holds random bytes: train from scratch (momentum 0.9 suits it, docs/model.md).
    print(f"use it:    dvc exp run {flags} -S train.init=scratch -S train.bn_momentum=0.9")


if __name__ == "__main__":
    main()
