"""train.device: a GPU that nvidia-smi lists but TensorFlow cannot use stops the train stage, unless the CPU is meant.

This machine has no GPU: a stand-in ``nvidia-smi`` on PATH lists one, and TensorFlow (the CPU set,
no CUDA wheels) sees none, which is exactly the state of a Colab GPU runtime with the CPU set installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_params
from tests.stage_checks import digests, half_written, one_error_line, stage
from tests.test_setup import A100, stand_in
from trafficdet.distribute import Distribution
from trafficdet.io import write_json
from trafficdet.params import TrainParams, load

ROOT = Path(__file__).resolve().parents[1]


def listing_a_gpu(tmp_path: Path) -> str:
    """A PATH whose nvidia-smi lists an A100, ahead of the real PATH."""
    stand_in(tmp_path / "bin", "nvidia-smi", f'echo "{A100}"')
    return f"{tmp_path / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


def test_train_stops_when_nvidia_smi_lists_a_gpu_tensorflow_cannot_use(tmp_path: Path) -> None:
    """One line naming the cause and the fix, before any data is read: the repo holds the cache stage's
    records but no TFRecords, and nothing is written."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("stages", "trafficdet", "dvc.yaml"):  # dvc.yaml: the resume fingerprint hashes the code it lists
        (repo / name).symlink_to(ROOT / name)
    write_params(repo / "params.yaml", train={"init": "scratch"})
    for side, size in (("train", 16), ("val", 4)):
        write_json(repo / f"data/cache/{side}/cache.json", {"size": size, "num_shards": 1})
    before = digests(repo, outputs=True)

    result = stage(repo, "train", PATH=listing_a_gpu(tmp_path), CUDA_VISIBLE_DEVICES="0")
    line = one_error_line(result, "nvidia-smi lists 1 GPU (NVIDIA A100-SXM4-40GB) but TensorFlow sees none")
    assert "CUDA 12.2 and cuDNN 8.9 libraries" in line and "12 of tensorflow[and-cuda]'s nvidia-* wheels missing" in line
    assert "make setup GPU=1" in line and "train.device: cpu" in line
    assert result.stdout == ""  # no device line: it did not start
    assert digests(repo, outputs=True) == before and half_written(repo) == []


def test_train_device_cpu_trains_on_the_cpu_with_a_gpu_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same machine with ``train.device: cpu`` passes, and the stage's first line says so."""
    from trafficdet.device import device_line, use_device

    monkeypatch.setenv("PATH", listing_a_gpu(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    params = load(TrainParams, ROOT / "params.yaml")
    with pytest.raises(Exception, match="nvidia-smi lists 1 GPU"):
        use_device(params)  # auto, the default
    use_device(params.model_copy(update={"device": "cpu"}))
    import tensorflow as tf

    line = device_line(tf.distribute.get_strategy(), params.model_copy(update={"device": "cpu"}), Distribution("off", 1))
    assert line == f"CPU only, {len(os.sched_getaffinity(0))} cores, float32, global batch {params.batch_size}"


def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path: Path) -> None:
    """make gpu-check where nvidia-smi is there but finds no GPU (no driver): one line, exit 0."""
    stand_in(
        tmp_path / "bin",
        "nvidia-smi",
        "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9",
    )
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "bench/bench_gpu.py"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "gpu-check: no GPU here (nvidia-smi lists none): nothing to measure; run make gpu-check on a machine with one"
    ]
