"""COCO-sized synthetic data for the speed benchmarks: a labelled folder and its Model Maker cache.

The fixture's scenes are flat colour and compress to a few KB; COCO's 640x480 photos
average about 160 KB. Grain is added so that the JPEGs are COCO-sized too, since JPEG
decoding (in the cache stage and in every training step) costs more for more entropy.
"""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testkit.fixture import make_scene  # noqa: E402
from trafficdet.io import write_json  # noqa: E402

CLASSES = ["person", "bicycle", "car", "motorcycle", "bus", "truck", "traffic_light"]
FIXTURE_TO_CLASS = {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 8: 6, 10: 7}  # fixture's COCO ids -> 1..K


def coco_folder(root: Path, images: int, width: int = 640, height: int = 480, grain: float = 18.0, seed: int = 0) -> Path:
    """Write ``root/images/*.jpg`` and ``root/labels.json`` (Model Maker's COCO layout); return ``root``."""
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    coco_images, annotations = [], []
    for index in range(images):
        scene = make_scene(rng, width, height)
        pixels = np.asarray(scene.image, dtype=np.float32) + noise.normal(0, grain, (height, width, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        file_name = f"{index:012d}.jpg"
        (root / "images" / file_name).write_bytes(buffer.getvalue())
        coco_images.append({"id": index + 1, "file_name": file_name, "width": width, "height": height})
        for category_id, bbox, _ in scene.objects:
            if category_id in FIXTURE_TO_CLASS:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": index + 1,
                        "category_id": FIXTURE_TO_CLASS[category_id],
                        "bbox": bbox,
                        "area": bbox[2] * bbox[3],
                        "iscrowd": 0,
                    }
                )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    write_json(root / "labels.json", {"images": coco_images, "annotations": annotations, "categories": categories})
    return root


def mean_jpeg_kb(root: Path) -> float:
    sizes = [path.stat().st_size for path in (root / "images").glob("*.jpg")]
    return sum(sizes) / len(sizes) / 1024
