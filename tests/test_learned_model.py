"""A model that learned: trained on the tiny cached data until it finds a car, then exported, compared and run."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from testkit.fixture import write_video
from tests.conftest import PipelineRun, copy_of, run
from tests.stage_checks import native_noise
from tests.test_pipeline import set_param
from tests.test_training import INT8_NETWORK, conv_tensor_types, expected_learning_rates, logged_learning_rates
from trafficdet.app import AppDetector, Detection, read_frame

# A run on the cached repo's 28 training images that learns enough to find a car in an image it
# never saw: from scratch, so BatchNorm's moving statistics must keep up (0.9), and a higher
# learning rate than the fine-tuning default, decaying as params.yaml's schedule does.
# Measured (40 epochs): the known car is found at score 0.56 (IoU 0.65) in float32 and float16,
# 0.56 dynamic, 0.50 int8 (IoU 0.70); 60 epochs gave 0.64, 30 only 0.34; the 1-epoch model finds
# nothing >= 0.4. 40, not 60: the suite's time budget (BENCHMARKS.md, "make test from a fresh
# clone"). With one TensorFlow intra-op thread (TF_NUM_INTRAOP_THREADS=1) the 60-epoch run found
# it at only 0.44: the sums split differently, so on a machine with other cores or other CPU
# instructions the margin may be thinner. The architecture is pinned to the one measured,
# whatever params.yaml's default becomes.
LEARNING = {"architecture": "mobilenet_multi_avg", "epochs": 40, "learning_rate": 1.0, "bn_momentum": 0.9}
SCORE_THRESHOLD = 0.4  # an app's working threshold, not 0 (at 0 any model "detects")


@pytest.fixture(scope="module")
def learned_repo(cached_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cached repo trained with LEARNING and exported (float32)."""
    repo = copy_of(cached_repo, tmp_path_factory.mktemp("learned") / "repo")
    for key, value in LEARNING.items():
        set_param(repo, "train", key, value)
    run([sys.executable, "-m", "stages.train"], repo)
    run([sys.executable, "-m", "stages.export"], repo)
    return repo


@pytest.mark.slow
def test_learning_rate_decays_as_scheduled(learned_repo: Path) -> None:
    """The logged rate after each epoch is Model Maker's warm-up + cosine schedule, ending at cosine_decay_alpha."""
    logged = logged_learning_rates(learned_repo)
    assert logged == pytest.approx(expected_learning_rates(learned_repo, LEARNING["epochs"]), rel=1e-5)
    assert logged[-1] < logged[len(logged) // 2] < max(logged)  # decays (cosine_decay_alpha: 1.0 keeps it flat)


def known_object(repo: Path) -> tuple[Path, str, list[float]]:
    """The validation image holding the largest car (the commonest class in the scenes); its class and box (x, y, w, h)."""
    val = json.loads((repo / "data/split/val/labels.json").read_text())
    (car,) = (c["id"] for c in val["categories"] if c["name"] == "car")
    files = {image["id"]: image["file_name"] for image in val["images"]}
    cars = [a for a in val["annotations"] if a["category_id"] == car]
    largest = max(cars, key=lambda a: (a["bbox"][2] * a["bbox"][3], a["id"]))
    return repo / "data/images" / files[largest["image_id"]], "car", largest["bbox"]


def iou(a: tuple[float, ...] | list[float], b: tuple[float, ...] | list[float]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)


def finds(model: Path, image: Path, label: str, box: list[float]) -> list[Detection]:
    """The app's detections of ``label`` at SCORE_THRESHOLD that overlap ``box`` with IoU >= 0.5."""
    with AppDetector(model, max_results=25, score_threshold=SCORE_THRESHOLD) as detector:
        found = detector.detect(read_frame(image))
    return [d for d in found if d.label == label and iou(d.box, box) >= 0.5]


EXPORT_VARIANTS = """
import shutil, sys
from pathlib import Path
from stages.export import export
from trafficdet.params import ExportParams, load
from trafficdet.paths import MODEL
params, variants = load(ExportParams), Path(sys.argv[1])
shutil.copy(MODEL, variants / "float32.tflite")
for kind in sys.argv[2:]:
    export(params.model_copy(update={"quantization": kind}))
    shutil.copy(MODEL, variants / f"{kind}.tflite")
"""


@pytest.mark.slow
def test_exported_model_finds_a_known_object(learned_repo: Path, tiny_pipeline: PipelineRun, tmp_path: Path) -> None:
    """Every export variant of a model that learned finds it, through the app's detection; an untrained one does not."""
    image, label, box = known_object(learned_repo)
    assert image.name == known_object(tiny_pipeline.repo)[0].name  # the same validation image in both repos
    untrained = tiny_pipeline.repo / "models/model.tflite"  # 1 epoch from scratch: the same data, the same export
    assert not finds(untrained, image, label, box), "the check must fail for a model that has not learned"

    # The fixture exported float32 through the stage; the other variants go through the stage's own
    # export() in one process (one TensorFlow start instead of three: the suite's time budget).
    kinds = ("float16", "int8", "dynamic")
    exported = run([sys.executable, "-c", EXPORT_VARIANTS, str(tmp_path), *kinds], learned_repo)
    assert native_noise(exported.stderr) == [], exported.stderr  # no converter summary, no MediaPipe lines
    set_param(learned_repo, "export", "quantization", kinds[-1])  # params.yaml says what models/ holds
    sizes, types = {}, {}
    for kind in ("float32", *kinds):
        model = tmp_path / f"{kind}.tflite"
        sizes[kind] = model.stat().st_size
        types[kind] = conv_tensor_types(model)
        assert finds(model, image, label, box), f"{kind}: no {label} at score >= {SCORE_THRESHOLD} with IoU >= 0.5"
    assert sizes["float16"] < sizes["float32"] and sizes["int8"] < sizes["float16"] and sizes["dynamic"] < sizes["float16"]
    float32 = {"input": {"float32"}, "weights": {"float32"}, "output": {"float32"}}
    assert types["float32"] == types["float16"] == float32 and types["int8"] == INT8_NETWORK
    # Dynamic range: int8 weights (the small ones stay float) on float activations, what the qat_int8 check refuses.
    assert types["dynamic"]["input"] == types["dynamic"]["output"] == {"float32"} and "int8" in types["dynamic"]["weights"]


@pytest.mark.slow
def test_tflite_returns_the_keras_detections_on_the_same_input(learned_repo: Path) -> None:
    """The shipped file ends in the Keras model's own detection step, both clip boxes by one rule, and the app
    reads all of it.

    Fed each validation image's preprocessed tensor, the file's detections mapped back as the app maps them
    (onto the padded square, clipped to the frame) are those evaluate scores for the Keras model
    (``keras_batch_detections``, on evaluate's batches): same count and classes, scores and boxes equal. And
    on square frames of the model's size (Tasks resizes nothing), ``AppDetector`` returns exactly the file's
    detections, every category, boxes cut to whole pixels as Tasks reports them (floor of corner and size).
    """
    code = """
import json, math, tempfile, numpy as np, tensorflow as tf
from pathlib import Path
from stages.evaluate import detection_step, keras_batch_detections
from trafficdet.app import AppDetector, clip_box
from trafficdet.modelmaker.build import keras_model, preprocessor, restore_detector
from trafficdet.modelmaker.cache import load_dataset, quiet_tensorflow
from trafficdet.params import EvaluateParams, load
from trafficdet.paths import TRAINED
from trafficdet.tflite_model import convert, with_metadata
quiet_tensorflow()
detector = restore_detector(TRAINED, Path("unused"))
model = keras_model(detector)
step = detection_step(model)
def run_file(interpreter, image):
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[np.newaxis])
    interpreter.invoke()
    boxes, classes, scores, count = (interpreter.get_tensor(o["index"])[0] for o in interpreter.get_output_details())
    return [((boxes[i] * 1.0).tolist(), int(classes[i]) + 1, float(scores[i])) for i in range(int(count))]
float32_file = convert(detector)
converted = tf.lite.Interpreter(model_content=float32_file)
converted.allocate_tensors()
images = non_square = total = crossing = mismatched = other_rule = 0
worst_score = worst_box = 0.0
squares, labels = [], json.loads((TRAINED / "train.json").read_text())["labels"]  # background first
batch_size = load(EvaluateParams).batch_size
for x, y in load_dataset("val").gen_tf_dataset(batch_size, is_training=False, preprocess=preprocessor(detector)):  # as evaluate
    info = y["image_info"].numpy()
    assert (info[:, 1] == x.shape[1:3]).all()  # image_info row 1 is the model's square: Keras clips to it, as the file
    keras = keras_batch_detections(step(x, y), y)
    # The other rule, to show the comparison sees it: clipped to the image inside the letterbox before NMS.
    inside = model(x, anchor_boxes=y["anchor_boxes"], image_shape=info[:, 0] * info[:, 2], training=False)
    for b, image_id in enumerate(y["groundtruths"]["source_id"].numpy()):
        height, width = (int(v) for v in info[b, 0])
        images, non_square = images + 1, non_square + (height != width)
        side, found, raw = max(width, height), [], []  # Tasks reports boxes in the padded square's pixels
        for (ymin, xmin, ymax, xmax), category, score in run_file(converted, x[b].numpy()):
            ymin, xmin, ymax, xmax = ymin * side, xmin * side, ymax * side, xmax * side
            crossing += xmax > width or ymax > height
            raw.append((score, [ymin, xmin, ymax, xmax]))
            box = clip_box(xmin, ymin, xmax - xmin, ymax - ymin, width, height)  # as AppDetector
            if box is not None:
                found.append((category, score, box))
        ours = [(d["category_id"], d["score"], d["bbox"]) for d in keras if d["image_id"] == int(image_id)]
        total += len(ours)
        # Before the app's clip after NMS (which makes the two rules agree wherever NMS keeps the same boxes):
        # the other rule's boxes, in frame pixels, against the file's.
        n, scale = int(inside["num_detections"][b]), np.tile(info[b, 2], 2)
        other_rule += n != len(raw) or not (
            np.allclose(inside["detection_scores"][b, :n], [s for s, _ in raw], atol=1e-5)
            and np.allclose(inside["detection_boxes"][b, :n].numpy() / scale, [r for _, r in raw], atol=0.01)
        )
        if [c for c, _, _ in ours] != [c for c, _, _ in found]:
            mismatched += 1
            continue
        worst_score = max([worst_score] + [abs(a[1] - b[1]) for a, b in zip(ours, found)])
        worst_box = max([worst_box] + [abs(p - q) for a, b in zip(ours, found) for p, q in zip(a[2], b[2])])
        squares.append(np.clip(np.round(x[b].numpy() * 127.5 + 127.5), 0, 255).astype(np.uint8))  # 8-bit, for Tasks
print("keras-check", images, non_square, total, crossing, mismatched, worst_score, worst_box, other_rule, flush=True)
file = Path(tempfile.mkdtemp()) / "model.tflite"  # as export writes it (float32), whatever export ran last
file.write_bytes(with_metadata(float32_file, detector, labels[1:])[0])
shipped = tf.lite.Interpreter(model_path=str(file))
shipped.allocate_tensors()
app_total = app_mismatched = 0
app_worst_score = app_worst_box = 0.0
with AppDetector(file, max_results=100, score_threshold=0.0) as app:
    for frame in squares:
        side = frame.shape[0]
        want = []
        for (ymin, xmin, ymax, xmax), category, score in run_file(shipped, (frame.astype(np.float32) - 127.5) / 127.5):
            x0, y0, w, h = math.floor(xmin * side), math.floor(ymin * side), int((xmax - xmin) * side), int((ymax - ymin) * side)
            box = clip_box(x0, y0, w, h, side, side)  # Tasks' whole pixels, then the app's clip
            if box is not None:
                want.append((category, score, box))
        got = app.detect(frame)
        app_total += len(got)
        if [labels[c] for c, _, _ in want] != [d.label for d in got]:
            app_mismatched += 1
            continue
        app_worst_score = max([app_worst_score] + [abs(w[1] - d.score) for w, d in zip(want, got)])
        app_worst_box = max([app_worst_box] + [abs(p - q) for w, d in zip(want, got) for p, q in zip(w[2], d.box)])
print("tasks-check", len(squares), app_total, app_mismatched, app_worst_score, app_worst_box)
"""
    printed = run([sys.executable, "-c", code], learned_repo).stdout
    checked = printed.split("keras-check")[-1].split()[:8]
    images, non_square, total, crossing, mismatched, worst_score, worst_box, other_rule = checked
    assert int(non_square) == int(images) > 0  # every validation frame is 4:3: the letterbox has padding
    assert int(total) > 100  # a model that learned detects things (the untrained one: nothing above 0.05)
    assert int(crossing) > 0  # boxes ran into the padding: the rule after NMS was exercised
    assert int(mismatched) == 0, f"{mismatched} validation images differ in count or classes"
    assert float(worst_score) < 1e-5 and float(worst_box) < 0.01, printed  # box: frame pixels
    assert int(other_rule) > 0  # clipped inside the letterbox before NMS, Keras's boxes differ from the file's
    frames, app_total, app_mismatched, app_worst_score, app_worst_box = printed.split("tasks-check")[-1].split()
    assert int(frames) == int(images) and int(app_total) > 100
    assert int(app_mismatched) == 0, f"{app_mismatched} frames: the app's detections differ from the file's in count or classes"
    assert float(app_worst_score) < 1e-5 and float(app_worst_box) <= 1, printed  # whole pixels: 1 at a float's edge


@pytest.mark.slow
def test_predict_finds_what_evaluate_scored_on_a_quiet_terminal(learned_repo: Path, tmp_path: Path) -> None:
    """`make predict` on the validation images returns the TFLite detections the evaluate stage scored,
    box for box and score for score; neither prints a native log line; no box below the file's own
    score floor comes out, even at score 0. The evaluation's confusion matrix counts every object once."""
    evaluated = run([sys.executable, "-m", "stages.evaluate"], learned_repo)
    assert native_noise(evaluated.stderr) == [], evaluated.stderr
    val = json.loads((learned_repo / "data/split/val/labels.json").read_text())
    photos = tmp_path / "photos"
    photos.mkdir()
    for image in val["images"]:
        os.symlink(learned_repo / "data/images" / image["file_name"], photos / image["file_name"])
    runs = tmp_path / "runs"
    predicted = run([sys.executable, "-m", "ops.predict", str(photos), "--score", "0", "--out", str(runs)], learned_repo)
    assert native_noise(predicted.stderr) == [], predicted.stderr

    files = {image["id"]: image["file_name"] for image in val["images"]}
    names = {c["id"]: c["name"] for c in val["categories"]}
    scored = json.loads((learned_repo / "reports/evaluate/detections.json").read_text())
    expected = sorted((files[d["image_id"]], names[d["category_id"]], d["bbox"], d["score"]) for d in scored)
    found = json.loads((runs / "1/detections.json").read_text())
    assert sorted((d["file_name"], d["category"], d["bbox"], d["score"]) for d in found) == expected
    assert len(expected) > 100  # a model that learned: the untrained one finds nothing above its floor
    assert all(names[d["category_id"]] == d["category"] for d in found)  # the same category ids as the split's
    floor = json.loads((learned_repo / "models/metadata.json").read_text())["detection_step"]["score_threshold"]
    assert floor == 0.05 and min(d["score"] for d in found) >= floor
    assert sorted(p.name for p in (runs / "1").iterdir()) == sorted([*files.values(), "detections.json"])
    assert f"predict: {len(files)} images; {len(found)} boxes at score >= 0 -> {runs / '1'}/" in predicted.stdout
    assert "the model itself returns no box below 0.05" in predicted.stdout

    confusion = json.loads((learned_repo / "reports/evaluate/confusion.json").read_text())
    objects = Counter(names[a["category_id"]] for a in val["annotations"] if not a["iscrowd"])
    columns = dict(zip(confusion["labels"], (sum(column) for column in zip(*confusion["matrix"], strict=True)), strict=True))
    assert columns == {**dict.fromkeys(names.values(), 0), **objects, "background": columns["background"]}
    card = (learned_repo / "models/MODEL_CARD.md").read_text()
    assert "Red lights called green:" in card and "drops every box scoring below 0.05 itself" in card


@pytest.mark.slow
def test_predict_on_a_clip_gives_each_frame_what_the_app_finds_in_it(learned_repo: Path, tmp_path: Path) -> None:
    """A clip made by the fixture, in Tasks' VIDEO mode with timestamps: each frame's boxes are those the
    app's IMAGE mode finds in that decoded frame; the annotated clip keeps every frame."""
    import cv2

    from ops.predict import predict, video_frames

    clip = write_video(tmp_path / "street.mp4", frames=12)
    model = learned_repo / "models/model.tflite"
    result = predict(clip, model, 0.25, tmp_path / "runs")
    frames = list(video_frames(cv2.VideoCapture(str(clip))))
    with AppDetector(model, max_results=100, score_threshold=0.25) as detector:
        expected = sorted((k, d.label, list(d.box), d.score) for k, frame in enumerate(frames) for d in detector.detect(frame))
    assert sorted((d["frame"], d["category"], d["bbox"], d["score"]) for d in result.detections) == expected
    assert len(expected) > 10 and "car" in {label for _, label, _, _ in expected}
    assert result.read == "12 frames of street.mp4 at 10 fps"
    annotated = list(video_frames(cv2.VideoCapture(str(result.folder / "street.mp4"))))
    assert len(annotated) == 12 and annotated[0].shape == frames[0].shape
    assert sorted(p.name for p in result.folder.iterdir()) == ["detections.json", "street.mp4"]
