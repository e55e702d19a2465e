"""Run the shipped detector on your own photos, a folder of them, or a video clip.

    python -m ops.predict SOURCE [--model models/model.tflite] [--score 0.25] [--out runs/predict]
    make predict SOURCE=street.jpg            # or SOURCE=photos/, SOURCE=dashcam.mp4; MODEL=, SCORE=

Every frame goes through the app's own detection (trafficdet/app.py: read_frame, then
AppDetector's letterbox, MediaPipe Tasks and clipping), the code the evaluate stage scores:
photos in Tasks' IMAGE mode, a clip's frames in its VIDEO mode with their timestamps, as an
app runs a camera. Photos are turned upright as their EXIF orientation says (training and
evaluation ignore it). Writes a new run folder, runs/predict/<n>/ (the next free number):

    <name>                  each image with its boxes drawn (the same file name; .png added
                            to formats other than JPEG, PNG and BMP)
    <stem>.mp4              for a clip: the clip with its boxes drawn (MPEG-4 part 2)
    detections.json         COCO results format: one {image_id, file_name, category_id,
                            category, bbox [x, y, w, h] in pixels, score} per box; for a clip
                            image_id is the frame index (from 0), also given as "frame"

and prints the boxes per class. A bad source or model stops it with one line and no run
folder: it is written as a hidden temp folder and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trafficdet.errors import PipelineError, run_stage
from trafficdet.io import read_json, write_json
from trafficdet.paths import MODEL
from trafficdet.quiet import quiet_libraries

RUNS = Path("runs/predict")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")  # what TensorFlow's decoder reads (read_frame)
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv")
KEPT_FORMATS = (".jpg", ".jpeg", ".png", ".bmp")  # annotated images keep these formats; others get .png
MAX_RESULTS = 100  # as the evaluate stage (evaluate.max_detections): the file's own maximum
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
PALETTE += [(240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def model_labels(model: Path) -> list[str]:
    """The class names packed in ``model``'s MediaPipe metadata; one line if it is not such a model."""
    if not model.is_file():
        raise PipelineError(f"{model}: not found; build it with `dvc repro` (or `dvc pull`), or pass MODEL=<file.tflite>")
    content = model.read_bytes()
    if content[4:8] != b"TFL3":  # the TFLite flatbuffer's file identifier
        raise PipelineError(f"{model}: not a TFLite model; pass the .tflite file the export stage writes")
    from mediapipe.tasks.python.metadata.metadata import MetadataDisplayer

    try:
        labels = MetadataDisplayer.with_model_buffer(content).get_associated_file_buffer("labels.txt")
    except ValueError:  # no metadata, or none packing labels.txt
        raise PipelineError(
            f"{model}: a TFLite model without MediaPipe metadata (labels, normalisation), which MediaPipe Tasks needs; "
            "use the file the export stage writes (models/model.tflite)"
        ) from None
    return labels.decode().split()


def score_floor(model: Path) -> float | None:
    """The score below which the file itself drops every box, if models/metadata.json sits beside it."""
    metadata = model.parent / "metadata.json"
    return read_json(metadata).get("detection_step", {}).get("score_threshold") if metadata.is_file() else None


def find_images(folder: Path) -> list[Path]:
    images = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PipelineError(f"{folder}: no images in it ({' '.join(IMAGE_SUFFIXES)}); give a folder of photos, a photo or a clip")
    return images


def annotate(frame: np.ndarray, found: list[Any], labels: list[str]) -> np.ndarray:
    """``frame`` (RGB) with each detection's box and "class score" drawn, a colour per class."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    height, width = frame.shape[:2]
    line = max(2, round(min(width, height) / 200))
    font = ImageFont.load_default(size=max(11, round(min(width, height) / 40)))
    for detection in sorted(found, key=lambda d: d.score):  # the best on top
        x, y, w, h = detection.box
        colour = PALETTE[labels.index(detection.label) % len(PALETTE)] if detection.label in labels else PALETTE[0]
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=line)
        text = f"{detection.label} {detection.score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_w, tag_h = right - left + 2 * line, bottom - top + 2 * line
        tag_y = y - tag_h if y >= tag_h else y  # above the box if it fits
        draw.rectangle([x, tag_y, x + tag_w, tag_y + tag_h], fill=colour)
        ink = (0, 0, 0) if sum(colour) > 450 else (255, 255, 255)
        draw.text((x + line - left, tag_y + line - top), text, fill=ink, font=font)
    return np.asarray(image)


def records(found: list[Any], labels: list[str], image_id: int, file_name: str, frame: int | None = None) -> list[dict]:
    """COCO results for one image or frame: category_id is the class's position in the labels, from 1."""
    extra = {} if frame is None else {"frame": frame}
    return [
        {
            "image_id": image_id,
            "file_name": file_name,
            **extra,
            "category_id": labels.index(d.label) + 1,
            "category": d.label,
            "bbox": list(d.box),
            "score": d.score,
        }
        for d in found
    ]


def detector(model: Path, score: float, video: bool = False) -> Any:
    """The app's detector on ``model``; one line if MediaPipe's ObjectDetector refuses the file."""
    from trafficdet.app import AppDetector

    try:
        return AppDetector(model, max_results=MAX_RESULTS, score_threshold=score, video=video)
    except (RuntimeError, ValueError) as err:  # e.g. a classifier's file: metadata, but not a detector's
        raise PipelineError(f"{model}: MediaPipe's ObjectDetector cannot run it ({err})") from None


def progress(items: Any, total: int | None, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, total=total, unit=unit, disable=None, leave=False)  # None: no bar when not on a terminal


def predict_images(images: list[Path], model: Path, labels: list[str], score: float, out: Path) -> tuple[list[dict], str]:
    from PIL import Image

    from trafficdet.app import read_frame

    results = []
    with detector(model, score) as app:
        for image_id, path in enumerate(progress(images, len(images), "image")):
            frame = read_frame(path, upright=True)
            found = app.detect(frame)
            name = path.name if path.suffix.lower() in KEPT_FORMATS else path.name + ".png"
            Image.fromarray(annotate(frame, found, labels)).save(out / name, quality=95)
            results += records(found, labels, image_id, path.name)
    return results, f"{len(images)} image{'s' * (len(images) != 1)}"


def video_frames(capture: Any) -> Iterator[np.ndarray]:
    import cv2

    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)  # the app's frames are RGB


def open_video(clip: Path) -> Any:
    """An OpenCV capture of ``clip``, or one line if OpenCV cannot read it."""
    import cv2

    capture = cv2.VideoCapture(str(clip))
    if not capture.isOpened():
        raise PipelineError(f"{clip}: not a video OpenCV can read (damaged, truncated, or a codec its FFmpeg lacks)")
    return capture


def predict_video(clip: Path, model: Path, labels: list[str], score: float, out: Path) -> tuple[list[dict], str]:
    import cv2

    capture = open_video(clip)
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and 0 < fps < 1000 else 30.0  # a header without a rate: assume a camera's
    announced = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    results: list[dict] = []
    writer, index, last_ms = None, -1, -1
    try:
        with detector(model, score, video=True) as app:
            for index, frame in enumerate(progress(video_frames(capture), announced, "frame")):
                timestamp_ms = max(round(index * 1000 / fps), last_ms + 1)  # VIDEO mode needs them to grow
                last_ms = timestamp_ms
                found = app.detect_video_frame(frame, timestamp_ms)
                if writer is None:
                    height, width = frame.shape[:2]
                    writer = cv2.VideoWriter(str(out / f"{clip.stem}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
                    if not writer.isOpened():
                        raise PipelineError(f"{out}: OpenCV cannot write an MPEG-4 video there")
                writer.write(cv2.cvtColor(annotate(frame, found, labels), cv2.COLOR_RGB2BGR))
                results += records(found, labels, index, clip.name, frame=index)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    frames = index + 1
    if not frames:
        raise PipelineError(f"{clip}: no frame could be decoded (damaged, or a codec OpenCV's FFmpeg lacks)")
    note = f" (its header announces {announced}: the rest could not be decoded)" if announced and frames < announced else ""
    return results, f"{frames} frame{'s' * (frames != 1)} of {clip.name} at {fps:g} fps{note}"


def next_run(runs: Path) -> int:
    return 1 + max((int(p.name) for p in runs.iterdir() if p.name.isdigit()), default=0)


def publish(tmp: Path, runs: Path) -> Path:
    """Rename the finished temp folder to the next free runs/<n>; a taken number (a run finishing at
    the same time) makes the rename fail, and the next one is tried."""
    while True:
        target = runs / str(next_run(runs))
        try:
            os.rename(tmp, target)
            return target
        except OSError:
            if not target.exists():
                raise


def remove_stale(runs: Path) -> None:
    """Temp folders of runs that were killed (their process is gone)."""
    for stale in runs.glob(".tmp-*"):
        pid = stale.name.split("-")[1].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Run:
    """A finished run: its folder, the detections (COCO results), what was read, the model's classes."""

    folder: Path
    detections: list[dict]
    read: str
    labels: list[str]


def predict(source: Path, model: Path = MODEL, score: float = 0.25, runs: Path = RUNS) -> Run:
    """Detect in ``source`` (an image, a folder of images or a video) into the next runs/<n>."""
    if not source.exists():
        raise PipelineError(f"{source}: not found; give a photo, a folder of photos or a video")
    if not 0 <= score <= 1:
        raise PipelineError(f"score {score}: expected a number from 0 to 1, e.g. SCORE=0.25")
    if source.is_dir():
        images, clip = find_images(source), None
    elif source.suffix.lower() in VIDEO_SUFFIXES:
        images, clip = [], source
        open_video(clip).release()  # a bad clip is told before the model loads
    else:
        images, clip = [source], None
    labels = model_labels(model)
    runs.mkdir(parents=True, exist_ok=True)
    remove_stale(runs)
    tmp = Path(tempfile.mkdtemp(dir=runs, prefix=f".tmp-{os.getpid()}."))
    try:
        if clip is None:
            results, read = predict_images(images, model, labels, score, tmp)
        else:
            results, read = predict_video(clip, model, labels, score, tmp)
        write_json(tmp / "detections.json", results, indent=True)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a run folder gets the usual mode
        return Run(publish(tmp, runs), results, read, labels)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def summary(run: Run, score: float, floor: float | None) -> str:
    """What was read, how many boxes, where they went, then the boxes per class."""
    counts = Counter(d["category"] for d in run.detections)
    lines = [f"predict: {run.read}; {len(run.detections)} boxes at score >= {score:g} -> {run.folder}/"]
    if floor is not None and score < floor:
        lines.append(f"  (the model itself returns no box below {floor:g}: models/MODEL_CARD.md)")
    width = max(map(len, run.labels))
    lines += [f"  {name:{width}s} {counts[name]:6d}" for name in run.labels if counts[name]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="an image, a folder of images, or a video file")
    parser.add_argument("--model", type=Path, default=MODEL, help=f"the TFLite file (default: {MODEL})")
    parser.add_argument("--score", type=float, default=0.25, help="keep boxes scoring at least this (default: 0.25)")
    parser.add_argument("--out", type=Path, default=RUNS, help=f"where the numbered run folders go (default: {RUNS})")
    args = parser.parse_args()
    if not args.source:
        raise PipelineError("SOURCE: missing; give a photo, a folder of photos or a video: make predict SOURCE=street.jpg")
    quiet_libraries()
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # a bad clip gets our one line, not FFmpeg's as well
    run = predict(Path(args.source), args.model, args.score, args.out)
    print(summary(run, args.score, score_floor(args.model)))


if __name__ == "__main__":
    run_stage(main)
