"""Model stages on a small cached dataset: resume after SIGKILL, determinism, export variants, bad params."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import PipelineRun, run, stage_env
from tests.test_pipeline import detect, set_param


@pytest.fixture(scope="module")
def cached_repo(tiny_pipeline: PipelineRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo whose data stages have run once (the session's tiny run, model half removed); tests work on copies."""
    repo = copy_of(tiny_pipeline.repo, tmp_path_factory.mktemp("cached") / "repo")
    for output in ("models/train", "models/train_state", "reports/train", "reports/evaluate", ".dvc/cache/runs"):
        shutil.rmtree(repo / output, ignore_errors=True)
    for output in ("models/model.tflite", "models/metadata.json", "models/labels.txt", "reports/export.json"):
        (repo / output).unlink(missing_ok=True)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for stage in ("train", "export", "evaluate"):
        del lock["stages"][stage]
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    return repo


def copy_of(repo: Path, dest: Path) -> Path:
    shutil.copytree(repo, dest, symlinks=True)
    return dest


def checkpoint_values(prefix: Path) -> dict[str, np.ndarray]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


@pytest.mark.slow
def test_killed_training_resumes_from_last_epoch(cached_repo: Path, tmp_path: Path) -> None:
    repo = copy_of(cached_repo, tmp_path / "repo")
    set_param(repo, "train", "epochs", 3)
    history = repo / "models/train_state/history.json"
    backup = repo / "models/train_state/backup"
    child = subprocess.Popen(
        ["dvc", "repro", "train"],
        cwd=repo,
        env=stage_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None:
        done = json.loads(history.read_text()) if history.exists() else []
        if len(done) == 1 and (backup / "chief" / "checkpoint").exists():  # epoch 1 logged and backed up
            break
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 2 (an epoch takes several seconds here)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert len(json.loads(history.read_text())) == 1, "the kill should land during epoch 2"
    assert not (repo / "models/train/train.json").exists()

    resumed = run(["dvc", "repro", "train"], repo)
    assert "resuming after epoch 1" in resumed.stdout + resumed.stderr
    summary = json.loads((repo / "models/train/train.json").read_text())
    assert summary["epochs"] == 3
    for series in ("train/total_loss", "val/total_loss", "learning_rate"):
        rows = (repo / f"reports/train/plots/metrics/{series}.tsv").read_text().splitlines()[1:]
        assert [row.split("\t")[0] for row in rows] == ["0", "1", "2"], series  # each epoch once
    assert json.loads((repo / "reports/train/metrics.json").read_text())["step"] == 2


@pytest.mark.slow
def test_training_is_deterministic_and_exports_every_variant(cached_repo: Path, tmp_path: Path) -> None:
    repo = copy_of(cached_repo, tmp_path / "repo")
    run([sys.executable, "-m", "stages.train"], repo)
    first = checkpoint_values(repo / "models/train/float_ckpt")
    shutil.copytree(repo / "models/train", tmp_path / "first")
    run([sys.executable, "-m", "stages.train"], repo)
    second = checkpoint_values(repo / "models/train/float_ckpt")
    assert first.keys() == second.keys() and len(first) > 100
    different = [name for name in first if not np.array_equal(first[name], second[name])]
    assert different == []

    val = json.loads((repo / "data/split/val/labels.json").read_text())
    image = repo / "data/images" / val["images"][0]["file_name"]
    sizes = {}
    for kind in ("float32", "float16", "int8", "dynamic"):
        set_param(repo, "export", "quantization", kind)
        run([sys.executable, "-m", "stages.export"], repo)
        sizes[kind] = (repo / "models/model.tflite").stat().st_size
        assert detect(repo / "models/model.tflite", image), kind  # loads in MediaPipe Tasks and returns boxes
    assert sizes["float16"] < sizes["float32"] and sizes["int8"] < sizes["float16"] and sizes["dynamic"] < sizes["float16"]


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "architecture", "resnet50", r"train\.architecture: expected 'mobilenet_v2', .* got 'resnet50'"),
        ("train", "batch_size", 10_000, r"train\.batch_size: 10000 is larger than the training set"),
        ("train", "epochs", 0, r"train\.epochs: expected a positive integer, got 0"),
        ("export", "quantization", "int4", r"export\.quantization: expected 'float32', .* got 'int4'"),
        ("train", "qat", {"enabled": True}, r"train\.qat\.enabled: QAT does not work with the locked Model Maker"),
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


def test_bn_momentum_reaches_the_built_layers(cached_repo: Path, tmp_path: Path) -> None:
    """Setting layer.momentum after the build is silently ignored; the config value is not."""
    repo = copy_of(cached_repo, tmp_path / "repo")
    code = """
import tensorflow as tf
from pathlib import Path
from trafficdet.modelmaker import build_detector, cache_record, create_model, label_names, model_spec, write_scratch_checkpoint
labels = label_names(cache_record("train"))
write_scratch_checkpoint(model_spec("mobilenet_multi_avg", Path("init")), len(labels), 3e-5, Path("init"))
images = tf.random.stateless_uniform([4, 256, 256, 3], seed=[1, 2])
for momentum in (None, 0.9):
    detector = build_detector("mobilenet_multi_avg", Path("init"), labels, {}, 3e-5, Path("out"))
    create_model(detector, momentum)
    layer = next(l for l in detector._model.submodules if isinstance(l, tf.keras.layers.BatchNormalization))
    before = layer.moving_mean.numpy().copy()
    detector._model(images, training=True)
    print("moved", momentum, float(abs(layer.moving_mean.numpy() - before).sum()))
"""
    moved = dict(
        line.split()[1:] for line in run([sys.executable, "-c", code], repo).stdout.splitlines() if line.startswith("moved")
    )
    # one update moves the moving mean by (1 - momentum) of the gap: 10x further at 0.9 than at 0.99
    assert 8 < float(moved["0.9"]) / float(moved["None"]) < 12


def test_a_coco_trained_start_validated_on_train2017_images_prints_one_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Model Maker's checkpoints were trained on COCO train2017: validating on those images flatters AP."""
    from stages import train as train_stage
    from trafficdet.params import TrainParams, parse

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["train"]
    records = {
        "train": {"size": 40, "num_shards": 1, "origins": {"train2017": 40}},
        "val": {"size": 10, "num_shards": 1, "origins": {"train2017": 6, "val2017": 4}},
    }
    monkeypatch.setattr(train_stage.mm, "cache_record", lambda side: records[side])

    class StopError(Exception):
        pass

    def stop() -> None:
        raise StopError

    monkeypatch.setattr(train_stage.mm, "quiet_tensorflow", stop)  # the warning comes before any TensorFlow work
    with pytest.raises(StopError):
        train_stage.train(parse(TrainParams, {**base, "init": "pretrained"}))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: warning: 6 of 10 validation images are from COCO train2017")
    assert "optimistic" in lines[0]

    for init, origins in (("scratch", {"train2017": 6, "val2017": 4}), ("pretrained", {"val2017": 10})):
        records["val"]["origins"] = origins
        with pytest.raises(StopError):
            train_stage.train(parse(TrainParams, {**base, "init": init}))
        assert capsys.readouterr().out == ""
