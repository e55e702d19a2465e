"""Model stages on a small cached dataset: resume after SIGKILL, the ImageNet start point, BatchNorm momentum, bad params."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from testkit.fixture import download_params
from testkit.fixture_server import FixtureServer
from testkit.keras_weights import KERAS_WEIGHTS_PATH
from testkit.object_store import ACCESS_KEY, SECRET_KEY, ObjectStore
from testkit.repo_copy import commit_all
from tests.conftest import copy_of, run, stage_env
from tests.test_pipeline import set_param
from tests.test_remote import fresh_clone
from trafficdet.app import AppDetector, read_frame


def checkpoint_values(prefix: Path) -> dict[str, np.ndarray]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


QAT_TINY = {"enabled": True, "epochs": 1, "learning_rate": 0.3, "batch_size": 4}


def start_repro(repo: Path, **env: str) -> tuple[subprocess.Popen, Path]:
    """Start ``dvc repro train`` in its own process group, printing to a log beside the repo."""
    log = repo.parent / f"repro-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        child = subprocess.Popen(
            ["dvc", "repro", "train"], cwd=repo, env=stage_env(**env), start_new_session=True, stdout=out, stderr=out
        )
    return child, log


def wait_until(child: subprocess.Popen, ready: Callable[[], bool], log: Path) -> None:
    deadline = time.monotonic() + 600
    while not ready():
        assert child.poll() is None, f"the run ended before the awaited moment:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()}"
        time.sleep(0.05)


def start_and_kill(repo: Path, ready: Callable[[], bool], after_s: float = 0.0, **env: str) -> str:
    """Run ``dvc repro train`` until ``ready()``, ``after_s`` more seconds, then SIGKILL it; return what it printed."""
    child, log = start_repro(repo, **env)
    wait_until(child, ready, log)
    time.sleep(after_s)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    return log.read_text()


def logged_learning_rates(repo: Path) -> list[float]:
    rows = (repo / "reports/train/plots/metrics/learning_rate.tsv").read_text().splitlines()[1:]
    return [float(row.split("\t")[-1]) for row in rows]


def expected_learning_rates(repo: Path, epochs: int) -> list[float]:
    """The rate of each epoch's last step (what Keras' optimizer reports after it): Model Maker's linear
    warm-up over 10% of the steps, then cosine to alpha."""
    train = yaml.safe_load((repo / "params.yaml").read_text())["train"]
    steps = json.loads((repo / "data/cache/train/cache.json").read_text())["size"] // train["batch_size"]
    total, peak, alpha = steps * epochs, train["learning_rate"] * train["batch_size"] / 256, train["cosine_decay_alpha"]
    warmup = int(total * 0.1)
    rates = []
    for step in (steps * (epoch + 1) - 1 for epoch in range(epochs)):  # the schedule counts steps from 0
        cosine = (1 - alpha) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)) + alpha
        rates.append(peak * step / warmup if step < warmup else peak * cosine)
    return rates


def copy_tree(fs: Any, source: str, dest: str) -> None:
    """Copy every object under ``source`` to ``dest`` (replacing what is there), on the store."""
    if fs.exists(dest):
        fs.rm(dest, recursive=True)
    for path in fs.find(source):
        fs.copy(path, dest + path[len(source) :])
    fs.invalidate_cache()


@pytest.fixture
def data_server(fixture_tree) -> Iterator[FixtureServer]:
    """The loopback fixture, served for a whole test: a commit that names its URL can be cloned and reproduced.

    (Serving again later on the port the session's tiny pipeline once used races other tests' servers.)
    """
    with FixtureServer(fixture_tree[0]) as server:
        yield server


@pytest.mark.slow
def test_killed_training_resumes_from_last_epoch_then_reruns_only_qat(
    cached_repo: Path, object_store: ObjectStore, fixture_tree, data_server: FixtureServer, tmp_path: Path
) -> None:
    """One sequence, the state copied to the S3 store (train.resume_remote) after every epoch:

    1. first machine: a committed repo trains 2 float epochs + 1 QAT epoch. Right after its epoch-1
       copy reaches the store it is frozen (SIGSTOP) and the store's content saved: what losing the
       machine at that moment leaves. It then goes on, its float phase uninterrupted (the comparison),
       and is killed as QAT starts.
    2. second machine: a fresh clone of the same commit, empty work tree, the store as saved:
       `dvc repro` runs the data stages, restores the state from the store and trains epoch 2 only;
       its float checkpoint is byte for byte the uninterrupted one. Killed as QAT starts.
    3. `dvc repro` again there: the float phase is kept (local state), only QAT runs.
    """
    import fsspec

    endpoint = {"AWS_ENDPOINT_URL": object_store.endpoint}  # the store's keys: stage_env, as a user exports them
    root = f"{object_store.bucket}/resume-{time.monotonic_ns()}"
    url, lost = f"s3://{root}/state", f"{root}/lost-after-epoch-1"
    root = f"{root}/state"
    fs = fsspec.filesystem(
        "s3", key=ACCESS_KEY, secret=SECRET_KEY, client_kwargs={"endpoint_url": object_store.endpoint}, skip_instance_cache=True
    )
    pointer = f"{root}/LATEST.json"

    def copied_epochs() -> int:
        fs.invalidate_cache()
        return json.loads(fs.cat_file(pointer))["epochs"] if fs.exists(pointer) else 0

    first = copy_of(cached_repo, tmp_path / "first")
    for key, value in download_params(data_server.url, fixture_tree[1]).items():  # the data the commit names
        set_param(first, "download", key, value)
    set_param(first, "train", "epochs", 2)
    set_param(first, "train", "qat", QAT_TINY)
    set_param(first, "train", "resume_remote", url)
    commit_all(first, "2 float epochs + 1 QAT epoch, resume state on the S3 store")

    def float_done(repo: Path) -> Callable[[], bool]:
        marker = repo / "models/train_state/state.json"
        return lambda: marker.exists() and bool(json.loads(marker.read_text()).get("float_done"))

    child, log = start_repro(first, **endpoint)
    wait_until(child, lambda: copied_epochs() == 1, log)
    os.killpg(child.pid, signal.SIGSTOP)
    try:
        copy_tree(fs, root, lost)
    finally:
        os.killpg(child.pid, signal.SIGCONT)
    wait_until(child, float_done(first), log)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    uninterrupted = {p.name: p.read_bytes() for p in (first / "models/train_state").glob("float_ckpt.*")}
    assert len(uninterrupted) == 2 and "Epoch 2/2" in log.read_text()
    copy_tree(fs, lost, root)  # the store as the lost machine left it

    second = fresh_clone(first, tmp_path / "second")  # its data stages fetch from data_server, as committed
    printed = start_and_kill(second, float_done(second), **endpoint)
    assert f"train: restored the state after epoch 1 from {url}" in printed
    assert "resuming after epoch 1" in printed and "Epoch 2/2" in printed
    assert "Epoch 1/2" not in printed  # epochs redone after the loss: 0
    state = second / "models/train_state"
    assert {p.name: p.read_bytes() for p in state.glob("float_ckpt.*")} == uninterrupted  # the same weights
    assert not (second / "models/train/train.json").exists()

    finished = run(["dvc", "repro", "train"], second, **endpoint)
    assert "the float phase finished before the run stopped" in finished.stdout
    assert "Epoch 1/2" not in finished.stdout and "Epoch 2/2" not in finished.stdout  # no float epoch ran again
    summary = json.loads((second / "models/train/train.json").read_text())
    assert summary["epochs"] == 2 and len(summary["qat"]["history"]) == 1
    assert (second / "models/train/qat_ckpt.index").exists()
    assert sorted(p.name for p in state.iterdir()) == ["state.json"]  # kept state gone
    assert json.loads(fs.cat_file(pointer))["complete"] is True  # the store says so too: a next run may replace it
    for series in ("train/total_loss", "val/total_loss", "learning_rate"):
        rows = (second / f"reports/train/plots/metrics/{series}.tsv").read_text().splitlines()[1:]
        assert [row.split("\t")[0] for row in rows] == ["0", "1"], series  # each epoch once
    assert json.loads((second / "reports/train/metrics.json").read_text())["step"] == 1
    # The logged rate across the loss is the schedule's, epoch for epoch (the resumed run's optimizer
    # step count is restored with the weights).
    logged = logged_learning_rates(second)
    assert logged == pytest.approx(expected_learning_rates(second, 2), rel=1e-5) and logged[0] > logged[1]

    # The QAT model exports to a file whose network is int8 (the detection step after it stays
    # float: NMS has no int8 kernel) and that MediaPipe Tasks loads (one QAT epoch is not
    # calibrated enough to detect anything: the learned model's test checks detections).
    set_param(second, "export", "quantization", "qat_int8")
    run([sys.executable, "-m", "stages.export"], second)
    assert conv_tensor_types(second / "models/model.tflite") == INT8_NETWORK  # activations too, not only the weights
    assert json.loads((second / "models/metadata.json").read_text())["qat_epochs"] == 1
    with AppDetector(second / "models/model.tflite", max_results=5, score_threshold=0.0) as detector:
        val = json.loads((second / "data/split/val/labels.json").read_text())
        detector.detect(read_frame(second / "data/images" / val["images"][0]["file_name"]))  # loads and runs


def conv_tensor_types(model: Path) -> dict[str, set[str]]:
    """The types of every convolution's input, weights and output in a TFLite file (the network's bulk).

    An int8 network has int8 in all three; dynamic-range quantization stores int8 weights but
    computes on float activations; float16 dequantizes its weights to float32 before the op.
    """
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(model))
    tensors = {detail["index"]: detail["dtype"].__name__ for detail in interpreter.get_tensor_details()}
    convolutions = [op for op in interpreter._get_ops_details() if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    assert len(convolutions) > 50
    return {
        "input": {tensors[op["inputs"][0]] for op in convolutions},
        "weights": {tensors[op["inputs"][1]] for op in convolutions},
        "output": {tensors[op["outputs"][0]] for op in convolutions},
    }


INT8_NETWORK = {"input": {"int8"}, "weights": {"int8"}, "output": {"int8"}}


def test_imagenet_start_point_computes_the_keras_model_after_model_makers_restore(
    cached_repo: Path, tmp_path: Path, keras_weights: Path, server
) -> None:
    """Downloaded through the real code from the fixture server, then the train stage's init, restored by Model Maker:
    the detector's backbone levels equal the Keras model's matching blocks on the same images (tests/test_imagenet.py
    shows the same comparison fails with two same-shaped BatchNorms swapped)."""
    repo = copy_of(cached_repo, tmp_path / "repo")
    code = f"""
import numpy as np, tensorflow as tf
from pathlib import Path
from stages.download import download_checkpoint
from stages.train import init_checkpoint
from trafficdet.start import resolve_start
from testkit.keras_weights import keras_level_outputs
from trafficdet.fetch import RetryPolicy
from trafficdet.modelmaker.build import build_detector
from trafficdet.modelmaker.cache import cache_record, label_names
from trafficdet.modelmaker.training import create_model
from trafficdet.params import TrainParams, load

download_checkpoint("mobilenet_v2_imagenet", "{server.url}/{KERAS_WEIGHTS_PATH}", "", RetryPolicy(retries=1))
params = load(TrainParams).model_copy(update={{"init": "pretrained", "architecture": "mobilenet_v2"}})
labels = label_names(cache_record("train"))
start = resolve_start(params)
init_checkpoint(start, params, len(labels), Path("init"))
print("start", start.name)
detector = build_detector("mobilenet_v2", Path("init"), labels, {{}}, 3e-5, Path("out"))
create_model(detector, None)  # Model Maker's own restore of the init checkpoint
images = tf.random.stateless_uniform([2, 256, 256, 3], seed=[3, 4], minval=-1.0, maxval=1.0)
ours = detector._model._model.backbone(images, training=False)
theirs = keras_level_outputs(Path("{keras_weights}"), images)
gaps = [float(np.abs(ours[level].numpy() - value).max() / np.abs(value).max()) for level, value in theirs.items()]
print("levels", sorted(ours) == sorted(theirs), max(gaps))
"""
    out = run([sys.executable, "-c", code], repo).stdout
    assert "start mobilenet_v2_imagenet" in out
    same_levels, gap = out.split("levels")[-1].split()
    assert same_levels == "True" and float(gap) < 1e-5, out  # relative to each level's largest value (tests/test_imagenet.py)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "architecture", "resnet50", r"train\.architecture: expected 'mobilenet_v2', .* got 'resnet50'"),
        ("train", "batch_size", 10_000, r"train\.batch_size: 10000 is larger than the training set"),
        ("train", "epochs", 0, r"train\.epochs: expected a positive integer, got 0"),
        ("export", "quantization", "int4", r"export\.quantization: expected 'float32', .* got 'int4'"),
        ("export", "quantization", "qat_int8", r"export\.quantization: qat_int8 needs a model trained with QAT"),
        ("train", "qat", {**QAT_TINY, "batch_size": 10_000}, r"train\.qat\.batch_size: 10000 is larger than the training"),
        ("train", "qat", {"enabled": True}, r"train\.qat\.epochs: missing"),
        ("train", "init", "pretrained", r"train\.init: pretrained 'mobilenet_v2', but the download stage fetched 'scratch'"),
    ],
)
def test_bad_params_fail_before_tensorflow(
    cached_repo: Path, tmp_path: Path, section: str, key: str, value: object, message: str
) -> None:
    repo = copy_of(cached_repo, tmp_path / "repo")
    set_param(repo, section, key, value)
    (repo / "models/train").mkdir(parents=True, exist_ok=True)
    (repo / "models/train/train.json").write_text(json.dumps({"architecture": "mobilenet_multi_avg", "epochs": 1}))
    code = (
        f"import sys; from stages import {section} as stage; from trafficdet.params import load, {section.title()}Params\n"
        f"try:\n    stage.{section}(load({section.title()}Params))\n"
        "except Exception as err:\n    print(type(err).__name__, err)\n"
        "print('tensorflow imported:', 'tensorflow' in sys.modules)"
    )
    out = run([sys.executable, "-c", code], repo).stdout
    import re

    assert re.search(f"PipelineError params.yaml {message}", out), out
    assert "tensorflow imported: False" in out
    assert yaml.safe_load((repo / "params.yaml").read_text())[section][key] == value


def test_bn_momentum_reaches_the_built_layers_and_the_qat_model(cached_repo: Path, tmp_path: Path) -> None:
    """Setting layer.momentum after the build is silently ignored; the config value is not, also after QAT's rebuild."""
    repo = copy_of(cached_repo, tmp_path / "repo")
    code = """
import tensorflow as tf
from pathlib import Path
from trafficdet import modelmaker as mm
labels = mm.label_names(mm.cache_record("train"))
mm.write_scratch_checkpoint(mm.model_spec("mobilenet_v2", Path("init")), len(labels), 3e-5, Path("init"))
images = tf.random.stateless_uniform([4, 256, 256, 3], seed=[1, 2])
def moved(model):  # how far one training-mode call moves every BatchNorm moving mean, summed
    means = [v for v in model.variables if "moving_mean" in v.name]
    before = [v.numpy().copy() for v in means]
    model(images, training=True)
    return sum(float(abs(v.numpy() - b).sum()) for v, b in zip(means, before))
for momentum in (None, 0.9):
    detector = mm.build_detector("mobilenet_v2", Path("init"), labels, {}, 3e-5, Path("out"))
    mm.create_model(detector, momentum)
    print("moved", momentum, moved(detector._model))
    mm.convert_to_qat(detector)
    print("qat", momentum, moved(detector._model))
"""
    lines = [line.split() for line in run([sys.executable, "-c", code], repo).stdout.splitlines()]
    moved = {(line[0], line[1]): float(line[2]) for line in lines if line and line[0] in ("moved", "qat")}
    # one update moves the moving mean by (1 - momentum) of the gap: 10x further at 0.9 than at 0.99
    for phase in ("moved", "qat"):
        assert 8 < moved[phase, "0.9"] / moved[phase, "None"] < 12, phase


def test_a_coco_trained_start_validated_on_train2017_images_prints_one_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Model Maker's checkpoints were trained on COCO train2017: validating on those images flatters AP."""
    from stages import train as train_stage
    from trafficdet.modelmaker import cache as modelmaker_cache
    from trafficdet.params import TrainParams, parse
    from trafficdet.start import Start

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["train"]
    records = {
        "train": {"size": 40, "num_shards": 1, "origins": {"train2017": 40}},
        "val": {"size": 10, "num_shards": 1, "origins": {"train2017": 6, "val2017": 4}},
    }
    monkeypatch.setattr(modelmaker_cache, "cache_record", lambda side: records[side])  # where the train stage looks it up

    class StopError(Exception):
        pass

    def stop() -> None:
        raise StopError

    import tensorflow as tf

    # What comes before the warning: the device line (stood in for); the first TensorFlow work after it stops the run.
    monkeypatch.setattr(train_stage, "use_device", lambda params: None)
    monkeypatch.setattr(train_stage, "make_strategy", lambda plan, params: None)
    monkeypatch.setattr(train_stage, "device_line", lambda strategy, params, plan: "a stand-in device")
    monkeypatch.setattr(tf.keras.utils, "set_random_seed", lambda seed: stop())
    start = {"pretrained": "mobilenet_v2"}  # what the download stage fetched: Model Maker's COCO checkpoint
    monkeypatch.setattr(train_stage, "resolve_start", lambda params: Start(start.get(params.init, "scratch"), None))
    with pytest.raises(StopError):
        train_stage.train(parse(TrainParams, {**base, "init": "pretrained"}))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "train: a stand-in device" and len(lines) == 2
    assert lines[1].startswith("train: warning: 6 of 10 validation images are from COCO train2017")
    assert "optimistic" in lines[1]

    for init, fetched, origins in (
        ("scratch", "mobilenet_v2", {"train2017": 6, "val2017": 4}),
        ("pretrained", "mobilenet_v2_imagenet", {"train2017": 6, "val2017": 4}),  # ImageNet saw no COCO image
        ("pretrained", "mobilenet_v2", {"val2017": 10}),
    ):
        start["pretrained"], records["val"]["origins"] = fetched, origins
        with pytest.raises(StopError):
            train_stage.train(parse(TrainParams, {**base, "init": init}))
        assert capsys.readouterr().out == "train: a stand-in device\n"
