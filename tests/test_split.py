"""split: stratified by class presence, seeded, published; label files only; Model Maker's folder view."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from stages import split
from trafficdet.errors import PipelineError
from trafficdet.modelmaker import model_maker_folder


def synthetic_coco(n: int = 200, seed: int = 0) -> dict:
    """Images with a common class (1) and a rare one (2, ~5% of images)."""
    rng = random.Random(seed)
    images, annotations = [], []
    for image_id in range(n):
        images.append(
            {
                "id": image_id,
                "file_name": f"{image_id}.jpg",
                "width": 10,
                "height": 10,
                "published_split": "val" if image_id % 4 == 0 else "train",
            }
        )
        labels = [1] + ([2] if rng.random() < 0.05 else [])
        for label in labels:
            annotations.append({"id": len(annotations), "image_id": image_id, "category_id": label, "bbox": [1, 1, 2, 2]})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "rare"}]}


def test_rare_class_lands_on_both_sides_in_proportion() -> None:
    coco = synthetic_coco()
    usable = {image["file_name"] for image in coco["images"]}
    for seed in range(20):
        _, report = split.split_dataset(coco, usable, "stratified", 0.2, seed)
        rare_val, rare_train = report["val"]["classes"]["rare"]["images"], report["train"]["classes"]["rare"]["images"]
        assert rare_val >= 1 and rare_train >= 1
        assert abs(rare_val - 0.2 * (rare_val + rare_train)) <= 1
        assert abs(report["val"]["images"] - 40) <= 1


def test_split_is_seeded() -> None:
    coco = synthetic_coco()
    usable = {image["file_name"] for image in coco["images"]}
    first = split.split_dataset(coco, usable, "stratified", 0.2, 7)[0]
    assert first == split.split_dataset(coco, usable, "stratified", 0.2, 7)[0]
    assert first != split.split_dataset(coco, usable, "stratified", 0.2, 8)[0]


def test_published_split_is_reproduced() -> None:
    coco = synthetic_coco()
    usable = {image["file_name"] for image in coco["images"]}
    sides, report = split.split_dataset(coco, usable, "published", 0.2, 0)
    assert {image["id"] for image in sides["val"]["images"]} == {i for i in range(200) if i % 4 == 0}
    assert report["outside_published_split"] == 0
    for image in coco["images"]:
        del image["published_split"]
    with pytest.raises(PipelineError, match=r"published needs cocoTraffic's annotations"):
        split.split_dataset(coco, usable, "published", 0.2, 0)


def test_rejected_images_and_their_boxes_are_left_out() -> None:
    coco = synthetic_coco(20)
    usable = {image["file_name"] for image in coco["images"]} - {"3.jpg"}
    sides, _ = split.split_dataset(coco, usable, "stratified", 0.2, 0)
    kept = [image["id"] for side in sides.values() for image in side["images"]]
    assert 3 not in kept and len(kept) == 19
    assert all(ann["image_id"] != 3 for side in sides.values() for ann in side["annotations"])


def test_split_holds_labels_only_and_model_maker_sees_its_folder_layout(tmp_path: Path) -> None:
    store = tmp_path / "data/images"
    store.mkdir(parents=True)
    coco = synthetic_coco(10)
    for image in coco["images"]:
        (store / image["file_name"]).write_bytes(b"jpeg" + image["file_name"].encode())
    sides, _ = split.split_dataset(coco, {i["file_name"] for i in coco["images"]}, "stratified", 0.2, 0)
    split.write_split(sides, tmp_path / "data/split")
    # Plain files only: a DVC output that push/pull carry as is.
    assert sorted(p.relative_to(tmp_path / "data/split").as_posix() for p in (tmp_path / "data/split").rglob("*")) == [
        "train",
        "train/labels.json",
        "val",
        "val/labels.json",
    ]
    for side in ("train", "val"):
        labels_file = tmp_path / "data/split" / side / "labels.json"
        with model_maker_folder(labels_file, store, tmp_path) as folder:
            assert json.loads((folder / "labels.json").read_text()) == json.loads(labels_file.read_text())
            names = {image["file_name"] for image in sides[side]["images"]}
            assert {p.name for p in (folder / "images").iterdir()} == names
            for name in names:
                assert (folder / "images" / name).read_bytes() == b"jpeg" + name.encode()
        assert not folder.exists()


def test_model_maker_folder_names_a_missing_image(tmp_path: Path) -> None:
    coco = synthetic_coco(3)
    labels_file = tmp_path / "labels.json"
    labels_file.write_text(json.dumps(coco))
    (tmp_path / "images").mkdir()
    with pytest.raises(PipelineError, match=r"images/0\.jpg: missing \(listed in .*labels\.json\); run the images stage"):
        with model_maker_folder(labels_file, tmp_path / "images", tmp_path):
            pass
