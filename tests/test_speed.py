"""Speed work that must not change results: the parallel cache writer, the parallel training input, the speed params."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PipelineRun, copy_of, run
from tests.test_pipeline import set_param


def printed(out: str, tag: str) -> str:
    """What a child printed after ``tag`` on its own line (libraries print plenty around it)."""
    return next(line.removeprefix(f"{tag} ") for line in out.splitlines() if line.startswith(f"{tag} "))


def repeated_folder(repo: Path, side: str, dest: Path, copies: int, crowds: bool = False) -> int:
    """Model Maker's COCO folder of one split side, its images listed ``copies`` times under new names and ids.

    Over 100 images, so the cache has several shards and the round-robin order is checked; one more
    image has only a box outside it, so both writers must skip it and shift the round robin. Crowd
    regions are left out (as ``model_maker_folder`` does for Model Maker's writer) unless ``crowds``.
    """
    coco = json.loads((repo / "data/split" / side / "labels.json").read_text())
    if not crowds:
        coco["annotations"] = [ann for ann in coco["annotations"] if not ann.get("iscrowd")]
    (dest / "images").mkdir(parents=True)
    images, annotations = [], []
    for copy in range(copies):
        for image in coco["images"]:
            name = f"{copy}-{image['file_name']}"
            os.symlink((repo / "data/images" / image["file_name"]).resolve(), dest / "images" / name)
            images.append({**image, "id": copy * 1_000_000 + image["id"], "file_name": name})
        annotations += [
            {**ann, "id": copy * 1_000_000 + ann["id"], "image_id": copy * 1_000_000 + ann["image_id"]}
            for ann in coco["annotations"]
        ]
    outside = images[len(images) // 2]
    os.symlink(dest / "images" / outside["file_name"], dest / "images" / "outside.jpg")
    images.insert(1, {**outside, "id": 7, "file_name": "outside.jpg"})
    annotations.append({"id": 7, "image_id": 7, "category_id": 1, "bbox": [5000.0, 10.0, 20.0, 20.0], "area": 400, "iscrowd": 0})
    (dest / "labels.json").write_text(json.dumps({**coco, "images": images, "annotations": annotations}))
    return len(images)


def test_parallel_cache_writes_model_makers_bytes(tiny_pipeline: PipelineRun, tmp_path: Path) -> None:
    listed = repeated_folder(tiny_pipeline.repo, "train", tmp_path / "train", copies=8)
    assert repeated_folder(tiny_pipeline.repo, "train", tmp_path / "crowds" / "train", copies=8, crowds=True) == listed
    code = """
import filecmp, sys
from pathlib import Path
from trafficdet.modelmaker.cache import quiet_tensorflow, write_coco_cache
quiet_tensorflow()
import tensorflow as tf
folder, out = Path(sys.argv[1]), Path(sys.argv[2])
sizes = [write_coco_cache(folder, out / kind, parallel=kind == "parallel")[1] for kind in ("model_maker", "parallel")]
theirs, ours = (sorted(p.name for p in (out / kind).iterdir()) for kind in ("model_maker", "parallel"))
same = theirs == ours and all(filecmp.cmp(out / "model_maker" / n, out / "parallel" / n, shallow=False) for n in ours)
print("result", sizes, len(ours), same)
# With the crowd regions kept (the train side's ignore regions): each record is Model Maker's plus the
# regions after its objects, flagged image/object/is_crowd.
write_coco_cache(folder.parent / "crowds" / folder.name, out / "regions")
records = {kind: [r.numpy() for n in sorted((out / kind).glob("*.tfrecord*")) for r in tf.data.TFRecordDataset(str(n))]
           for kind in ("model_maker", "regions")}
flagged, stripped_same = 0, len(records["regions"]) == len(records["model_maker"])
for theirs_record, ours_record in zip(records["model_maker"], records["regions"]):
    example = tf.train.Example.FromString(ours_record)
    features = example.features.feature
    crowd = list(features["image/object/is_crowd"].int64_list.value) if "image/object/is_crowd" in features else []
    flagged += sum(crowd)
    if crowd:
        del features["image/object/is_crowd"]
        objects = crowd.count(0)
        assert crowd == [0] * objects + [1] * (len(crowd) - objects)
        for key in ("xmin", "xmax", "ymin", "ymax"):
            del features[f"image/object/bbox/{key}"].float_list.value[objects:]
        del features["image/object/class/label"].int64_list.value[objects:]
    stripped_same &= tf.train.Example.FromString(theirs_record) == example
print("regions", flagged, stripped_same)
from trafficdet.errors import PipelineError
broken = folder / "images" / sys.argv[3]
data = broken.read_bytes()
broken.unlink()
broken.write_bytes(data[: len(data) // 3])  # a real file now: the store behind the symlink stays intact
try:
    write_coco_cache(folder, out / "broken")
except PipelineError as err:
    print("error", err)
"""
    folder = tmp_path / "train"
    broken = json.loads((folder / "labels.json").read_text())["images"][5]["file_name"]
    out = run([sys.executable, "-c", code, str(folder), str(tmp_path / "out"), broken], tiny_pipeline.repo).stdout
    error = printed(out, "error")
    sizes, files, same = printed(out, "result").rsplit(" ", 2)
    assert json.loads(sizes) == [listed - 1, listed - 1]  # the image with only an outside box is skipped by both
    assert int(files) == 1 + (listed + 99) // 100  # metadata + shards of 100 images
    assert same == "True"
    flagged, stripped_same = printed(out, "regions").split()
    train = json.loads((tiny_pipeline.repo / "data/split/train/labels.json").read_text())
    assert int(flagged) == 8 * sum(1 for ann in train["annotations"] if ann.get("iscrowd")) > 0
    assert stripped_same == "True"
    # a JPEG that no longer decodes: one line naming it (the images stage had verified every file)
    line = error.strip()
    assert line.startswith(f"{folder / 'images' / broken}: not a readable JPEG (") and "\n" not in line
    assert line.endswith("); delete it and run the images stage again (dvc repro images)") and "{{" not in line


def test_training_input_is_model_makers_bit_for_bit(cached_repo: Path) -> None:
    """Two epochs (reshuffled) of Model Maker's training pipeline and of ours, under the stage's seeding: the same
    bits, but for the anchors over the train cache's crowd regions, which ours ignores (Model Maker is shown the
    objects alone, as its own writer would cache them)."""
    code = """
from pathlib import Path
import numpy as np
from trafficdet.modelmaker.build import model_spec
from trafficdet.modelmaker.cache import load_dataset, quiet_tensorflow
from trafficdet.modelmaker.training import training_dataset
quiet_tensorflow()
import tensorflow as tf
from mediapipe_model_maker.python.vision.object_detector.dataset import Dataset
from mediapipe_model_maker.python.vision.object_detector.preprocessor import Preprocessor
tf.config.experimental.enable_op_determinism()
preprocessor = Preprocessor(model_spec("mobilenet_multi_avg", Path("unused")))
data = load_dataset("train")
def objects_only(example):
    keep = tf.where(tf.logical_not(example["groundtruth_is_crowd"]))[:, 0]
    boxwise = ("groundtruth_classes", "groundtruth_boxes", "groundtruth_is_crowd", "groundtruth_area")
    return {**example, **{key: tf.gather(example[key], keep) for key in boxwise}}
objects = Dataset(dataset=data._dataset.map(objects_only), label_names=data.label_names, size=len(data))
def two_epochs(make):
    tf.keras.utils.set_random_seed(42)
    return [[tf.nest.map_structure(lambda t: t.numpy(), batch) for batch in make()] for _ in range(2)]
theirs = two_epochs(lambda: objects.gen_tf_dataset(4, is_training=True, shuffle=True, preprocess=preprocessor))
ours = two_epochs(lambda: training_dataset(data, preprocessor, 4, True))
same, ignored, arrays = True, 0, 0
for their_epoch, our_epoch in zip(theirs, ours):
    same &= len(their_epoch) == len(our_epoch)
    for (their_image, their_labels), (our_image, our_labels) in zip(their_epoch, our_epoch):
        their_weights, our_weights = their_labels.pop("cls_weights"), our_labels.pop("cls_weights")
        flat_theirs, flat_ours = tf.nest.flatten((their_image, their_labels)), tf.nest.flatten((our_image, our_labels))
        same &= all(np.array_equal(x, y) for x, y in zip(flat_theirs, flat_ours, strict=True))
        differ = their_weights != our_weights
        same &= bool((our_weights[differ] == 0).all() and (their_weights[differ] == 1).all())
        ignored += int(differ.sum())
        arrays += len(flat_ours) + 1
reshuffled = not all(np.array_equal(x, y) for x, y in zip(tf.nest.flatten(theirs[0]), tf.nest.flatten(theirs[1])))
print("result", arrays // 2, same, reshuffled, ignored)
"""
    arrays, same, reshuffled, ignored = printed(run([sys.executable, "-c", code], cached_repo).stdout, "result").split()
    assert int(arrays) > 8 * 4  # several batches of image + labels
    assert same == "True"
    assert reshuffled == "True"  # the epochs differ: the comparison covers the shuffle's seed too
    assert int(ignored) > 0  # the fixture's crowd regions (train2017 images) reach training as ignore regions


@pytest.mark.slow
def test_bfloat16_and_a_larger_batch_train_and_evaluate(cached_repo: Path, tmp_path: Path) -> None:
    """bfloat16 and a doubled batch in one short run: both read back from the trained model, the run prints and
    logs its time estimate, its first line says what it trains on (recorded with the timings), and the
    checkpoint evaluates (COCO metrics) in float32."""
    repo = copy_of(cached_repo, tmp_path / "repo")
    for key, value in {"mixed_precision": "bfloat16", "batch_size": 8, "epochs": 2}.items():
        set_param(repo, "train", key, value)
    out = run([sys.executable, "-m", "stages.train"], repo).stdout
    summary = json.loads((repo / "models/train/train.json").read_text())
    device = f"CPU only, {len(os.sched_getaffinity(0))} cores, bfloat16, global batch 8"
    assert out.splitlines()[0] == f"train: {device}", out
    assert summary["speed"] == {
        "compute_dtype": "bfloat16",
        "jit_compile": False,
        "loss_scaling": False,  # only float16 needs it
        "initial_learning_rate": pytest.approx(0.3 * 8 / 256),  # Model Maker's rule: learning_rate x batch / 256
    }
    rows = (repo / "reports/train/plots/metrics/train/total_loss.tsv").read_text().splitlines()[1:]
    losses = [float(row.split("\t")[1]) for row in rows]
    assert len(losses) == 2 and losses[1] < losses[0]  # it learns

    # The estimate: printed twice (after the first steps, after epoch 1), logged only under reports/timing.
    estimates = [line for line in out.splitlines() if " images/s -> about " in line]
    assert len(estimates) == 2, out
    assert estimates[0].startswith(f"train: {summary['train_images']} images x 2 epochs at ")
    assert "ends ~" in estimates[0] and "validation included" in estimates[1]
    timing = json.loads((repo / "reports/timing/train/metrics.json").read_text())
    assert timing["estimate"]["epochs_left"] == 1 and timing["estimate"]["images_per_s"] > 0
    assert timing["device"] == device  # a fact of the machine: with the timings, not in models/train
    assert "CPU only" not in (repo / "models/train/train.json").read_text()
    assert "estimate" not in (repo / "reports/train/metrics.json").read_text()

    code = """
import json
from pathlib import Path
from trafficdet.modelmaker.build import restore_detector
from trafficdet.modelmaker.cache import load_dataset, quiet_tensorflow
quiet_tensorflow()
detector = restore_detector(Path("models/train"), Path("export_unused"))
_, metrics = detector.evaluate(load_dataset("val"), batch_size=4)
print("result", json.dumps({name: float(value) for name, value in metrics.items()}))
"""
    metrics = json.loads(printed(run([sys.executable, "-c", code], repo).stdout, "result"))
    assert {"AP", "AP50", "ARmax100"} <= metrics.keys()
    assert all(-1 <= value <= 1 for value in metrics.values())


def test_jit_compile_reaches_keras_and_the_fpn_gradient_compiles(cached_repo: Path, tmp_path: Path) -> None:
    """XLA-compiling the whole train step takes over 10 minutes on this CPU (done by hand, see docs/speed.md);
    here: the flag reaches Model Maker's compile(), and the FPN's gradient, which XLA cannot compile in
    Model Maker's model, compiles in the one built for jit_compile."""
    code = """
from pathlib import Path
from trafficdet import modelmaker as mm
mm.quiet_tensorflow()
import tensorflow as tf
labels = mm.label_names(mm.cache_record("train"))
mm.write_scratch_checkpoint(mm.model_spec("mobilenet_multi_avg", Path("init")), len(labels), 3e-5, Path("init"))
for jit in (False, True):
    detector = mm.build_detector("mobilenet_multi_avg", Path("init"), labels, {}, 3e-5, Path("out"))
    mm.create_model(detector, None, jit_compile=jit)
    model = mm.keras_model(detector)
    model.compile(optimizer="sgd")  # as Model Maker's _train_model: no jit_compile argument
    network = model._model
    features = network.backbone(tf.zeros([2, 256, 256, 3]))

    @tf.function(jit_compile=True)
    def fpn_gradient(features):
        with tf.GradientTape() as tape:
            tape.watch(features)
            loss = tf.add_n([tf.reduce_sum(level) for level in network.decoder(features).values()])
        return tape.gradient(loss, features)

    try:
        fpn_gradient(features)
        compiled = "compiles"
    except tf.errors.InvalidArgumentError as err:
        compiled = "ResizeNearestNeighborGrad" in str(err) and "no-kernel"
    print("result", jit, model.jit_compile, compiled)
"""
    results = [
        line.split()[1:] for line in run([sys.executable, "-c", code], cached_repo).stdout.splitlines() if "result" in line
    ]
    assert results == [["False", "None", "no-kernel"], ["True", "True", "compiles"]]


def test_float16_without_a_gpu_is_refused_in_one_line(cached_repo: Path, tmp_path: Path) -> None:
    repo = copy_of(cached_repo, tmp_path / "repo")
    set_param(repo, "train", "mixed_precision", "float16")
    result = run([sys.executable, "-m", "stages.train"], repo, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: params.yaml train.mixed_precision: float16 needs a GPU (TensorFlow sees none here); "
        "use off, or bfloat16 (runs on a CPU, slowly)"
    )
    assert "Traceback" not in result.stderr
    assert not (repo / "models/train").exists()
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["mixed_precision"] == "float16"
