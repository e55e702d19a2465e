"""What a new user tries first: a handful of their own images in a COCO folder, through every stage to a model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from testkit.fixture import COCO_CATEGORIES, make_scene
from tests.conftest import make_repo, run, set_param, stages_run
from tests.test_pipeline import detect, tflite_labels
from trafficdet.io import write_json

IMAGES = 5


def write_own_coco_folder(root: Path, images: int = IMAGES, seed: int = 3) -> list[str]:
    """``root/labels.json`` + ``root/images/``: street scenes, annotation ids from 0 as hand-made files often have.

    Returns the category names present, most frequent first.
    """
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    coco: dict = {"images": [], "annotations": [], "categories": COCO_CATEGORIES}
    for image_id in range(1, images + 1):
        scene = make_scene(rng)
        name = f"street_{image_id}.jpg"
        scene.image.save(root / "images" / name, format="JPEG", quality=90)
        coco["images"].append({"id": image_id, "file_name": name, "width": scene.image.width, "height": scene.image.height})
        for category_id, bbox, _lamp in scene.objects:
            coco["annotations"].append(
                {"id": len(coco["annotations"]), "image_id": image_id, "category_id": category_id, "bbox": bbox}
            )
    write_json(root / "labels.json", coco)
    names = {c["id"]: c["name"] for c in COCO_CATEGORIES}
    counts: dict[str, int] = {}
    for ann in coco["annotations"]:
        counts[names[ann["category_id"]]] = counts.get(names[ann["category_id"]], 0) + 1
    return sorted(counts, key=lambda name: (-counts[name], name))


@pytest.mark.slow
def test_own_five_image_coco_folder_through_every_stage(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path / "repo",
        {
            "download": {"source": "coco_folder", "source_path": "data/own/street", "pretrained": "scratch"},
            "train": {"init": "scratch", "epochs": 1, "batch_size": 2},
            "export": {"latency_images": 1, "latency_repeats": 1},
        },
    )
    classes = write_own_coco_folder(repo / "data/own/street")
    assert len(classes) >= 6  # many classes over a handful of images: the case that used to fail
    set_param(repo, "filter", "classes", classes)
    set_param(repo, "filter", "include_all", [])

    # The default split is COCO's own assignment, which own data does not have: one line says what to set.
    first = run(["dvc", "repro", "split"], repo, check=False)
    errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert first.returncode != 0 and "Traceback" not in first.stderr
    assert len(errors) == 1 and "set split.method: stratified" in errors[0], first.stderr

    set_param(repo, "split", "method", "stratified")
    result = run(["dvc", "repro"], repo)
    assert stages_run(result.stdout) == ["split", "cache", "train", "export", "evaluate"]

    split_report = json.loads((repo / "reports/split.json").read_text())
    assert (split_report["train"]["images"], split_report["val"]["images"]) == (4, 1)  # round(5 x 0.2) = 1
    val = json.loads((repo / "data/split/val/labels.json").read_text())
    model = repo / "models/model.tflite"
    assert tflite_labels(model) == classes
    detect(model, repo / "data/images" / val["images"][0]["file_name"])  # loads and runs in MediaPipe Tasks
    coco = json.loads((repo / "reports/evaluate/coco.json").read_text())
    assert set(coco["tflite"]["per_class"]) == set(classes) and -1 <= coco["tflite"]["AP"] <= 1
