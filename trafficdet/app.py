"""What the app must do around the model: the input contract, and detection the way the app runs it.

Model Maker trains and evaluates on letterboxed images: the frame scaled to fit the
model's square input with its aspect ratio kept, placed top-left, the rest filled with
the normalisation mean (0 after normalising, pixel value 127.5). MediaPipe Tasks'
ObjectDetector instead stretches whatever frame it is given to the model's size. So the
app pads each frame to a max(W, H) square first (image top-left, grey 128, the nearest
8-bit value to 127.5): Tasks' stretch of that square is then the letterbox the model was
trained on, and since the image sits at the origin its boxes come back in the frame's own
pixels (clip them to the frame). Measured on the demo model: see docs/app.md.

The file ends in the Keras model's own detection step (trafficdet/tflite_model.py), so Tasks
adds no post-processing of its own and no option is needed.

Evaluation, export's latency run, `make predict` (ops/predict.py), the benchmarks and the
tests all detect through ``AppDetector``, so the reported AP is the app's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from trafficdet.errors import PipelineError

# Grey: the 8-bit value nearest the normalisation mean. Model Maker's letterbox pads with the mean itself
# (127.5 as a pixel, 0 after normalising), which no uint8 frame can hold; 128 is 0.004 after normalising.
PAD_VALUE = 128

# What models/metadata.json tells the app developer (and the model card repeats).
INPUT_CONTRACT = {
    "color": "RGB, 8 bits per channel",
    "geometry": "letterbox",
    "letterbox": (
        "pad each frame to a square of side max(width, height): frame at the top-left corner, "
        f"the rest filled with RGB ({PAD_VALUE}, {PAD_VALUE}, {PAD_VALUE}); no resizing (MediaPipe Tasks resizes)"
    ),
    "pad_value": [PAD_VALUE] * 3,
    "runtime": "MediaPipe Tasks ObjectDetector (mediapipe 0.10.21), running_mode IMAGE/VIDEO/LIVE_STREAM",
    "options": {},
    "boxes": "in the padded square's pixels, which are the frame's pixels: clip them to the frame (width x height)",
    "classes": "one box can carry several categories (kept for each class by the model's per-class NMS): each is a detection",
}


def letterbox(frame: np.ndarray, fill: int = PAD_VALUE) -> np.ndarray:
    """``frame`` (H x W x 3, uint8) padded to a max(H, W) square, frame top-left, the rest ``fill``."""
    height, width = frame.shape[:2]
    side = max(height, width)
    if height == width:
        return np.ascontiguousarray(frame)
    square = np.full((side, side, frame.shape[2]), fill, dtype=frame.dtype)
    square[:height, :width] = frame
    return square


def clip_box(x: float, y: float, w: float, h: float, width: int, height: int) -> tuple[float, float, float, float] | None:
    """A box (x, y, w, h) clipped to a ``width`` x ``height`` frame; None if nothing of it is inside."""
    x0, y0 = float(min(max(x, 0), width)), float(min(max(y, 0), height))
    x1, y1 = float(min(max(x + w, 0), width)), float(min(max(y + h, 0), height))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1 - x0, y1 - y0


def read_frame(path: Path, upright: bool = False) -> np.ndarray:
    """An image file as an H x W x 3 uint8 RGB array, as a camera frame would arrive.

    Decoded by TensorFlow, as training and the Keras evaluation decode it: JPEG decoders differ
    by a level here and there (TensorFlow's default DCT is the fast one, Pillow's the accurate
    one), and that alone moved the demo model's AP by 0.012 (docs/app.md). A camera frame is
    never a JPEG, so the evaluation feeds the app the pixels the model was measured on.

    ``upright``: turned as its EXIF orientation says, as a photo viewer shows it (a phone stores
    a portrait photo sideways and says so there). Training and evaluation ignore the tag, as
    COCO's boxes do; `make predict` on your own photos honours it.
    """
    import tensorflow as tf

    try:
        frame = tf.io.decode_image(Path(path).read_bytes(), channels=3, expand_animations=False).numpy()
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found") from None
    except tf.errors.InvalidArgumentError:
        raise PipelineError(f"{path}: not an image TensorFlow can decode (JPEG, PNG, GIF or BMP), or a damaged one") from None
    return upright_frame(path, frame) if upright else frame


def upright_frame(path: Path, frame: np.ndarray) -> np.ndarray:
    """``frame`` turned by the EXIF orientation of the file at ``path`` (Pillow's exif_transpose table)."""
    from PIL import ExifTags, Image

    with Image.open(path) as image:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    turn = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(orientation)
    return frame if turn is None else np.asarray(Image.fromarray(frame).transpose(turn))


@dataclass(frozen=True)
class Detection:
    """One detection in frame pixels: class, score, box as (x, y, w, h)."""

    label: str
    score: float
    box: tuple[float, float, float, float]


class AppDetector:
    """MediaPipe Tasks' ObjectDetector behind the app's pre- and post-processing (a context manager).

    ``video``: Tasks' VIDEO running mode, for the frames of a clip in order (``detect_video_frame``),
    as an app runs a camera feed; otherwise IMAGE mode (``detect``), frames independent.
    """

    def __init__(self, model: Path, max_results: int = 100, score_threshold: float = 0.0, video: bool = False) -> None:
        from mediapipe.tasks.python import BaseOptions
        from mediapipe.tasks.python.vision import ObjectDetector, ObjectDetectorOptions, RunningMode

        options = ObjectDetectorOptions(
            base_options=BaseOptions(model_asset_path=str(model)),
            running_mode=RunningMode.VIDEO if video else RunningMode.IMAGE,
            max_results=max_results,
            score_threshold=score_threshold,
        )
        self._detector: Any = ObjectDetector.create_from_options(options)

    def __enter__(self) -> AppDetector:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._detector.close()

    def detect(self, frame: np.ndarray) -> list[Detection]:
        """Detections in ``frame`` (H x W x 3 uint8 RGB): letterbox, Tasks, boxes clipped to the frame."""
        return self._in_frame(frame, self._detector.detect(_square(frame)))

    def detect_video_frame(self, frame: np.ndarray, timestamp_ms: int) -> list[Detection]:
        """``detect`` for the next frame of a clip (VIDEO mode); ``timestamp_ms`` must grow frame by frame."""
        return self._in_frame(frame, self._detector.detect_for_video(_square(frame), timestamp_ms))

    @staticmethod
    def _in_frame(frame: np.ndarray, result: Any) -> list[Detection]:
        """Tasks' ``result`` as detections in ``frame``'s pixels, best first.

        The file's NMS is per class, so one box can be kept for several classes (a truck also
        scored as a car). Tasks hands those back as one detection whose ``categories`` list
        every class: each category is a detection of its own, as in the Keras model (taking
        only the first lost a quarter of the demo's detections).
        """
        height, width = frame.shape[:2]
        detections = []
        for found in result.detections:
            box = found.bounding_box
            clipped = clip_box(box.origin_x, box.origin_y, box.width, box.height, width, height)
            if clipped is None:  # a box wholly in the padding
                continue
            detections += [Detection(category.category_name, float(category.score), clipped) for category in found.categories]
        return sorted(detections, key=lambda detection: -detection.score)


def _square(frame: np.ndarray) -> Any:
    """``frame`` letterboxed, as the ``mp.Image`` Tasks takes."""
    import mediapipe as mp

    return mp.Image(image_format=mp.ImageFormat.SRGB, data=letterbox(frame))
