"""The TFLite file's own detection step against tf-models' (no training: the same decoded boxes and scores fed to both)."""

from __future__ import annotations

import numpy as np
import pytest

# The Keras model's detection generator settings (tf-models' DetectionGenerator v2 as Model Maker builds it), with
# fewer anchors and a smaller pre_nms_top_k than the 256 px model's 12,276 and 5,000, to keep the test quick.
CONFIG = {"pre_nms_top_k": 2000, "pre_nms_score_threshold": 0.05, "nms_iou_threshold": 0.5, "max_num_detections": 100}
ANCHORS, CLASSES = 2500, 9  # more anchors than pre_nms_top_k: the cut before NMS acts


def clustered_boxes(seed: int, objects: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded boxes [N, 4] (ymin, xmin, ymax, xmax in input pixels) crowded around ``objects`` objects, and scores [N, K].

    Every box is one of an object's, jittered so that its neighbours overlap it above and below
    the IoU threshold; each object has one or two likely classes, with scores mostly low (many
    under the 0.05 threshold), the other classes noise around the threshold.
    """
    rng = np.random.default_rng(seed)
    centres = rng.uniform(20, 236, (objects, 2))
    sizes = rng.uniform(8, 90, (objects, 2))
    owner = rng.integers(0, objects, ANCHORS)
    centre = centres[owner] + rng.normal(0, 0.1, (ANCHORS, 2)) * sizes[owner]
    size = sizes[owner] * rng.uniform(0.8, 1.25, (ANCHORS, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1).clip(0, 256)
    likely = rng.integers(0, CLASSES, (objects, 2))
    peak = rng.uniform(0.2, 1.0, (objects, 2))
    scores = rng.uniform(0, 0.051, (ANCHORS, CLASSES))  # a little of it above 0.05
    for column in range(2):
        scores[np.arange(ANCHORS), likely[owner, column]] = peak[owner, column] * rng.uniform(0, 1, ANCHORS) ** 3
    return boxes.astype(np.float32), scores.astype(np.float32)


def tf_models_detections(boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """tf-models' ``_generate_detections_v2`` (the Keras model's NMS): boxes, classes from 0, scores, count."""
    import tensorflow as tf
    from official.vision.modeling.layers.detection_generator import _generate_detections_v2

    nmsed_boxes, nmsed_scores, nmsed_classes, valid = _generate_detections_v2(
        tf.constant(boxes)[tf.newaxis, :, tf.newaxis, :], tf.constant(scores)[tf.newaxis], **CONFIG
    )
    n = int(valid[0])
    return nmsed_boxes[0, :n].numpy(), nmsed_classes[0, :n].numpy(), nmsed_scores[0, :n].numpy(), n


def in_file_detections(cases: list[tuple[int, int]]) -> list[tuple[np.ndarray, ...]]:
    """``per_class_nms`` converted to TFLite as the export converts it, run by the TFLite interpreter on each case's input."""
    import tensorflow as tf

    from trafficdet.tflite_model import per_class_nms

    @tf.function(input_signature=[tf.TensorSpec([ANCHORS, 4], tf.float32), tf.TensorSpec([ANCHORS, CLASSES], tf.float32)])
    def nms(boxes: tf.Tensor, scores: tf.Tensor) -> tuple[tf.Tensor, ...]:
        return per_class_nms(boxes, scores, CONFIG)

    from tensorflow.lite.tools import flatbuffer_utils

    converter = tf.lite.TFLiteConverter.from_concrete_functions([nms.get_concrete_function()])
    converter.target_spec.supported_ops = (tf.lite.OpsSet.TFLITE_BUILTINS,)
    model = converter.convert()
    assert len(flatbuffer_utils.convert_bytearray_to_object(model).subgraphs) == 1  # Tasks runs one subgraph
    interpreter = tf.lite.Interpreter(model_content=model)
    interpreter.allocate_tensors()
    by_name = {detail["name"]: detail["index"] for detail in interpreter.get_input_details()}
    found = []
    for seed, objects in cases:
        boxes, scores = clustered_boxes(seed, objects)
        (boxes_in,) = (index for name, index in by_name.items() if "boxes" in name)
        (scores_in,) = (index for name, index in by_name.items() if "scores" in name)
        interpreter.set_tensor(boxes_in, boxes)
        interpreter.set_tensor(scores_in, scores)
        interpreter.invoke()
        out_boxes, out_classes, out_scores, count = (interpreter.get_tensor(o["index"]) for o in interpreter.get_output_details())
        n = int(count)
        found.append((out_boxes[:n], out_classes[:n], out_scores[:n], n))
    return found


CASES = [(0, 3), (1, 6), (2, 25)]  # (seed, objects): fewer than 100 detections left, then the cut at 100 acting


@pytest.fixture(scope="module")
def in_file() -> list[tuple[np.ndarray, ...]]:
    return in_file_detections(CASES)


def test_the_files_nms_is_tf_models_generate_detections_v2(in_file: list[tuple[np.ndarray, ...]]) -> None:
    """Counts, classes and order exact, scores within 1e-6, boxes within 1e-4 px, on crowded random input."""
    counts = []
    for (seed, objects), (boxes, classes, scores, n) in zip(CASES, in_file, strict=True):
        want_boxes, want_classes, want_scores, want_n = tf_models_detections(*clustered_boxes(seed, objects))
        counts.append(want_n)
        assert n == want_n, f"seed {seed}: {n} detections, tf-models {want_n}"
        assert np.array_equal(classes.astype(np.int64), want_classes), f"seed {seed}: classes differ"
        np.testing.assert_allclose(scores, want_scores, atol=1e-6, rtol=0)
        np.testing.assert_allclose(boxes, want_boxes, atol=1e-4, rtol=0)
    assert min(counts) < CONFIG["max_num_detections"] == max(counts), counts  # both regimes were compared


@pytest.mark.parametrize("change", ["iou", "class_agnostic"])
def test_the_comparison_sees_a_different_nms(change: str, in_file: list[tuple[np.ndarray, ...]]) -> None:
    """The same input through tf-models with another IoU, or suppressing across classes: the check above must fail."""
    import tensorflow as tf
    from official.vision.modeling.layers.detection_generator import _generate_detections_v2

    (boxes, classes, scores, n), (seed, objects) = in_file[0], CASES[0]
    settings = {**CONFIG, "nms_iou_threshold": 0.6} if change == "iou" else {**CONFIG, "use_class_agnostic_nms": True}
    decoded, all_scores = clustered_boxes(seed, objects)
    other_boxes, other_scores, other_classes, valid = _generate_detections_v2(
        tf.constant(decoded)[tf.newaxis, :, tf.newaxis, :], tf.constant(all_scores)[tf.newaxis], **settings
    )
    m = int(valid[0])
    same = (
        m == n
        and np.array_equal(other_classes[0, :m].numpy(), classes.astype(np.int64))
        and np.allclose(other_scores[0, :m].numpy(), scores, atol=1e-6, rtol=0)
        and np.allclose(other_boxes[0, :m].numpy(), boxes, atol=1e-4, rtol=0)
    )
    assert not same
