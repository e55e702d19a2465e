"""The app's input contract: the padded square, boxes back in the frame, and why it matches training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trafficdet.app import PAD_VALUE, clip_box, letterbox


def street_frame(height: int = 240, width: int = 320) -> np.ndarray:
    """A seeded 4:3 frame with structure at every scale (gradients, blocks, noise)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack([x * 255 / width, y * 255 / height, (x + y) % 64 * 4], axis=-1)
    for _ in range(12):
        top, left = rng.integers(0, height - 40), rng.integers(0, width - 60)
        frame[top : top + 40, left : left + 60] = rng.integers(0, 256, 3)
    return np.clip(frame + rng.normal(0, 8, frame.shape), 0, 255).astype(np.uint8)


def test_letterbox_pads_bottom_right_with_grey() -> None:
    frame = street_frame()
    square = letterbox(frame)
    assert square.shape == (320, 320, 3) and square.dtype == np.uint8
    assert np.array_equal(square[:240], frame)
    assert (square[240:] == PAD_VALUE).all()
    tall = frame.transpose(1, 0, 2)  # portrait: the padding goes right
    assert np.array_equal(letterbox(tall)[:, :240], tall) and (letterbox(tall)[:, 240:] == PAD_VALUE).all()
    assert np.array_equal(letterbox(square), square)


def test_clip_box_keeps_the_frame_part() -> None:
    assert clip_box(10, 20, 30, 40, 320, 240) == (10, 20, 30, 40)
    assert clip_box(300, 230, 50, 50, 320, 240) == (300, 230, 20, 10)  # runs into the padding
    assert clip_box(-5, 10, 20, 20, 320, 240) == (0, 10, 15, 20)
    assert clip_box(10, 250, 30, 30, 320, 240) is None  # wholly in the padding


def test_tasks_stretch_of_the_padded_frame_is_model_makers_letterbox(tmp_path: Path) -> None:
    """What the model sees: Model Maker's eval preprocessing of a frame vs a plain resize of what the app hands Tasks.

    The app's square, resized to the model's size (what Tasks does), must be Model Maker's
    letterbox up to resampling; the raw frame (Tasks' stretch), a centred frame or black
    padding must not. Units: normalised pixels (-1..1).
    """
    import tensorflow as tf
    from mediapipe_model_maker.python.vision.object_detector.preprocessor import Preprocessor

    from trafficdet.modelmaker.build import model_spec

    spec = model_spec("mobilenet_multi_avg", tmp_path)
    side = spec.input_image_shape[0]
    frame = street_frame()
    data = {
        "image": tf.constant(frame),
        "groundtruth_classes": tf.constant([1], tf.int64),
        "groundtruth_boxes": tf.constant([[0.1, 0.1, 0.5, 0.5]]),
        "groundtruth_is_crowd": tf.constant([False]),
        "groundtruth_area": tf.constant([100.0]),
        "source_id": tf.constant("1"),
        "height": tf.constant(240),
        "width": tf.constant(320),
    }
    trained_on, _ = Preprocessor(spec)(data, is_training=False)

    def seen(square: np.ndarray) -> np.ndarray:
        resized = tf.image.resize(tf.constant(square, tf.float32), [side, side], method="bilinear")
        return (resized.numpy() / 255 - 0.5) / 0.5

    def gap(square: np.ndarray) -> float:
        return float(np.abs(seen(square) - trained_on.numpy()).mean())

    centred = np.full((320, 320, 3), PAD_VALUE, np.uint8)
    centred[40:280] = frame
    gaps = {
        "app": gap(letterbox(frame)),
        "stretch": gap(frame),
        "centred": gap(centred),
        "black": gap(letterbox(frame, fill=0)),
    }
    # Measured: app 0.001 (bilinear resampling of the same pixels), black 0.25, stretch 0.44, centred 0.46.
    assert gaps["app"] < 0.01, gaps
    assert min(gaps["stretch"], gaps["centred"], gaps["black"]) > 0.1, gaps


def test_every_category_of_a_box_is_a_detection() -> None:
    """Tasks groups the boxes the model kept for several classes into one detection with several categories
    (measured on the demo model: a quarter of its detections); the app reports each, best score first."""
    from mediapipe.tasks.python.components.containers.bounding_box import BoundingBox
    from mediapipe.tasks.python.components.containers.category import Category
    from mediapipe.tasks.python.components.containers.detections import Detection as TasksDetection
    from mediapipe.tasks.python.components.containers.detections import DetectionResult

    from trafficdet.app import AppDetector, Detection

    class Tasks:  # what MediaPipe Tasks' ObjectDetector returns for a 320 x 240 frame, padded to 320 x 320
        def detect(self, image: object) -> DetectionResult:
            assert image.width == image.height == 320
            truck_or_car = [Category(1, 0.8, None, "truck"), Category(0, 0.3, None, "car")]
            return DetectionResult(
                detections=[
                    TasksDetection(bounding_box=BoundingBox(10, 20, 100, 50), categories=truck_or_car),
                    TasksDetection(bounding_box=BoundingBox(200, 200, 30, 60), categories=[Category(0, 0.5, None, "car")]),
                    TasksDetection(bounding_box=BoundingBox(5, 250, 20, 20), categories=[Category(2, 0.9, None, "bus")]),
                ]
            )

    app = AppDetector.__new__(AppDetector)
    app._detector = Tasks()
    assert app.detect(street_frame()) == [  # the bus lies wholly in the padding (rows 240-319)
        Detection("truck", 0.8, (10.0, 20.0, 100.0, 50.0)),
        Detection("car", 0.5, (200.0, 200.0, 30.0, 40.0)),
        Detection("car", 0.3, (10.0, 20.0, 100.0, 50.0)),
    ]
