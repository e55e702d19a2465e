"""Ignore regions in training: crowd regions (and unrelabelled lights under filter.unrelabelled_lights: ignore)
travel through Model Maker's cache flagged ``is_crowd`` and no anchor over them is taught "background"."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from trafficdet.modelmaker.build import model_spec
from trafficdet.modelmaker.cache import model_maker_folder, quiet_tensorflow, write_coco_cache

OBJECT = [20.0, 30.0, 60.0, 50.0]  # COCO xywh, in a 256 x 256 image: the model's input size, so no rescaling
REGION = [150.0, 140.0, 70.0, 80.0]


def iou(anchors: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of [y0, x0, y1, x1] anchors with one box, computed here (not by tf-models)."""
    y0, x0 = np.maximum(anchors[:, 0], box[0]), np.maximum(anchors[:, 1], box[1])
    y1, x1 = np.minimum(anchors[:, 2], box[2]), np.minimum(anchors[:, 3], box[3])
    inter = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
    area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    return inter / (area + (box[2] - box[0]) * (box[3] - box[1]) - inter)


def yxyx(box: list[float]) -> np.ndarray:
    x, y, w, h = box
    return np.array([y, x, y + h, x + w])


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One image with an object and a crowd region, through the cache stage's folder and writer and back, labelled."""
    quiet_tensorflow()
    import tensorflow as tf
    from mediapipe_model_maker.python.core.data.cache_files import TFRecordCacheFiles
    from mediapipe_model_maker.python.vision.object_detector.dataset import Dataset
    from mediapipe_model_maker.python.vision.object_detector.preprocessor import Preprocessor

    from trafficdet.modelmaker.training import _train_preprocess

    root = tmp_path_factory.mktemp("ignore")
    (root / "store").mkdir()
    Image.new("RGB", (256, 256), (90, 90, 90)).save(root / "store/a.jpg", format="JPEG")
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 256, "height": 256}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": OBJECT, "area": 3000.0, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": REGION, "area": 5000.0, "iscrowd": 1},
        ],
        "categories": [{"id": 1, "name": "car"}],
    }
    (root / "split/train").mkdir(parents=True)
    (root / "split/train/labels.json").write_text(json.dumps(coco))
    pre = Preprocessor(model_spec("mobilenet_v2", root / "unused"))
    no_flip_no_jitter = (tf.constant(1.0), tf.constant(1.0), tf.constant([0.0, 0.0]))
    result = {"anchors": tf.concat([tf.reshape(a, [-1, 4]) for a in pre.anchor_boxes.values()], 0).numpy()}
    for name, regions in (("ignored", True), ("dropped", False)):  # dropped: the crowd region left out, as before
        with model_maker_folder(root / "split/train/labels.json", root / "store", root, ignore_regions=regions) as folder:
            files, size = write_coco_cache(folder, root / name)
        assert size == 1
        example = next(iter(Dataset.from_cache(TFRecordCacheFiles(files.cache_prefix_filename, str(root / name), 1))._dataset))
        _, labels = _train_preprocess(pre)(example, no_flip_no_jitter)
        result[name] = {"is_crowd": example["groundtruth_is_crowd"].numpy().tolist()}
        result[name] |= {key: labels[key].numpy() for key in ("cls_weights", "box_weights")}
        result[name]["cls_targets"] = tf.concat([tf.reshape(t, [-1]) for t in labels["cls_targets"].values()], 0).numpy()
    return result


def test_a_crowd_region_reaches_training_flagged_and_its_anchors_are_ignored(labelled: dict) -> None:
    ignored, dropped, anchors = labelled["ignored"], labelled["dropped"], labelled["anchors"]
    assert ignored["is_crowd"] == [False, True]  # through our cache writer and Model Maker's decoder
    assert dropped["is_crowd"] == [False]  # the validation side's cache: objects only, as Model Maker's writer

    overlap = iou(anchors, yxyx(REGION))
    over_region = (overlap >= 0.5) | (np.arange(len(anchors)) == overlap.argmax())  # what a real box there would claim
    assert over_region.sum() >= 3
    # Left out, the region teaches "background" (target -1 = all-zero one-hot, weight 1) on every one of its anchors ...
    assert (dropped["cls_targets"][over_region] == -1).all() and (dropped["cls_weights"][over_region] == 1).all()
    # ... flagged, those anchors and only those get no classification (nor box) loss.
    assert ((ignored["cls_weights"] == 0) == over_region).all()
    assert (ignored["box_weights"][over_region] == 0).all()
    # Everything else is labelled exactly as without the region (Model Maker's labels): the object trains as before.
    assert np.array_equal(ignored["cls_weights"][~over_region], dropped["cls_weights"][~over_region])
    for key in ("cls_targets", "box_weights"):
        assert np.array_equal(ignored[key], dropped[key]), key
    assert (dropped["cls_targets"][iou(anchors, yxyx(OBJECT)) >= 0.5] == 1).all()
