"""train.distribution_strategy: params checked before TensorFlow, mirrored over 2 CPU replicas, 2 workers on 127.0.0.1."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.train import validate
from testkit.object_store import free_ports
from testkit.repo_copy import ROOT
from tests.conftest import PipelineRun, copy_of, run, stage_env
from tests.test_pipeline import set_param
from tests.test_training import checkpoint_values
from trafficdet.distribute import KEEP_WORKER_OUTPUTS, plan_distribution
from trafficdet.errors import PipelineError
from trafficdet.params import TrainParams, parse

TRAIN_SIZE, VAL_SIZE = 28, 7  # images in the tiny cached repo: COCO's split of the fixture's 40 (train2017 / val2017)


def train_params(**changes: object) -> TrainParams:
    """The repository's train: section with ``changes``, as the stage would load it."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    params.update({"init": "scratch", "epochs": 1, "batch_size": 4, **changes})
    return parse(TrainParams, params)


def tf_config(index: int, ports: list[int], chief: bool = False) -> str:
    """TF_CONFIG for worker ``index`` of a cluster on 127.0.0.1 (or the chief task, with ``chief``)."""
    hosts = [f"127.0.0.1:{port}" for port in ports]
    if chief:
        cluster = {"chief": hosts[:1], "worker": hosts[1:]}
        task = {"type": "chief", "index": 0} if index == 0 else {"type": "worker", "index": index - 1}
    else:
        cluster, task = {"worker": hosts}, {"type": "worker", "index": index}
    return json.dumps({"cluster": cluster, "task": task})


@pytest.mark.parametrize(
    ("changes", "env", "message"),
    [
        (
            {"distribution_strategy": "tpu"},
            None,
            r"params\.yaml train\.distribution_strategy: expected 'off', 'one_device', 'mirrored' or "
            r"'multi_worker_mirrored', got 'tpu'",
        ),
        (
            {"distribution_strategy": "mirrored", "cpu_replicas": 2, "batch_size": 3},
            None,
            r"params\.yaml train\.batch_size: 3 does not split evenly over 2 replicas \(mirrored\); it is the global batch, "
            r"use a multiple of 2",
        ),
        (
            {"distribution_strategy": "mirrored", "num_gpus": 4, "batch_size": 6},
            None,
            r"params\.yaml train\.batch_size: 6 does not split evenly over 4",
        ),
        (
            {"cpu_replicas": 2},
            None,
            r"params\.yaml train\.cpu_replicas: 2 logical CPU devices only apply to distribution_strategy: mirrored",
        ),
        (
            {"distribution_strategy": "mirrored", "cpu_replicas": 0},
            None,
            r"params\.yaml train\.cpu_replicas: expected a positive integer, got 0",
        ),
        (
            {"distribution_strategy": "one_device", "num_gpus": 2},
            None,
            r"params\.yaml train\.num_gpus: one_device trains on one device",
        ),
        (
            {"distribution_strategy": "mirrored", "cpu_replicas": 2, "batch_size": 8},
            None,
            r"params\.yaml train\.batch_size: 8 is larger than the validation set \(7 images\); with 2 replicas validation runs "
            r"on whole batches only",
        ),
        ({"num_gpus": -1}, None, r"params\.yaml train\.num_gpus: expected an integer >= 0, got -1"),
        (
            {"distribution_strategy": "multi_worker_mirrored"},
            None,
            r"params\.yaml train\.distribution_strategy: multi_worker_mirrored needs the TF_CONFIG environment variable "
            r"on every worker, e\.g\. TF_CONFIG=",
        ),
        ({"distribution_strategy": "multi_worker_mirrored"}, "{'cluster': 1}", r"TF_CONFIG: not valid JSON"),
        (
            {"distribution_strategy": "multi_worker_mirrored"},
            '{"cluster": {"worker": ["127.0.0.1:1"]}}',
            r"TF_CONFIG: needs a 'cluster' and a 'task' object",
        ),
        (
            {"distribution_strategy": "multi_worker_mirrored"},
            tf_config(2, [1, 2]),
            r"TF_CONFIG: task worker 2 is not in cluster\.worker \(2 hosts\)",
        ),
        (
            {"distribution_strategy": "multi_worker_mirrored"},
            json.dumps({"cluster": {"worker": ["127.0.0.1:1"], "ps": ["127.0.0.1:2"]}, "task": {"type": "worker", "index": 0}}),
            r"TF_CONFIG: cluster has \['ps'\]; multi_worker_mirrored takes only 'chief' and 'worker' tasks",
        ),
        (
            {"distribution_strategy": "multi_worker_mirrored", "batch_size": 6},
            tf_config(0, [1, 2, 3, 4]),
            r"params\.yaml train\.batch_size: 6 does not split evenly over 4 replicas \(4 workers\)",
        ),
    ],
    ids=[
        "unknown-strategy",
        "batch-vs-cpu-replicas",
        "batch-vs-gpus",
        "cpu-replicas-without-mirrored",
        "cpu-replicas-zero",
        "one-device-several-gpus",
        "val-smaller-than-batch",
        "negative-gpus",
        "no-tf-config",
        "tf-config-not-json",
        "tf-config-no-task",
        "tf-config-index-out-of-range",
        "tf-config-ps-task",
        "batch-vs-workers",
    ],
)
def test_bad_distribution_params(monkeypatch: pytest.MonkeyPatch, changes: dict, env: str | None, message: str) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    if env is not None:
        monkeypatch.setenv("TF_CONFIG", env)
    with pytest.raises(PipelineError) as err:
        validate(train_params(**changes), TRAIN_SIZE, VAL_SIZE)
    assert re.match(message, str(err.value)), str(err.value)


def test_who_is_the_chief(monkeypatch: pytest.MonkeyPatch) -> None:
    """Task chief if the cluster has one, else worker 0; replicas = workers x GPUs per worker (>= 1)."""
    params = train_params(distribution_strategy="multi_worker_mirrored")
    seen = []
    for chief_task in (False, True):
        for index in range(3):
            monkeypatch.setenv("TF_CONFIG", tf_config(index, [1, 2, 3], chief=chief_task))
            plan = plan_distribution(params)
            seen.append((plan.task, plan.chief, plan.workers, plan.replicas))
    assert seen == [
        ("worker 0", True, 3, 3),
        ("worker 1", False, 3, 3),
        ("worker 2", False, 3, 3),
        ("chief 0", True, 3, 3),
        ("worker 0", False, 3, 3),
        ("worker 1", False, 3, 3),
    ]
    monkeypatch.setenv("TF_CONFIG", tf_config(0, [1, 2]))
    assert plan_distribution(params.model_copy(update={"num_gpus": 4})).replicas == 8
    monkeypatch.delenv("TF_CONFIG")
    assert plan_distribution(train_params(distribution_strategy="mirrored", cpu_replicas=3, batch_size=6)).replicas == 3
    assert plan_distribution(train_params(distribution_strategy=False)).strategy == "off"  # YAML 1.1's unquoted off


def test_missing_tf_config_is_one_line_before_tensorflow(tmp_path: Path) -> None:
    """The stage's own exit: one error line, no traceback, TensorFlow never imported."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(distribution_strategy="multi_worker_mirrored", batch_size=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for side, size in (("train", TRAIN_SIZE), ("val", VAL_SIZE)):
        (tmp_path / f"data/cache/{side}").mkdir(parents=True)
        (tmp_path / f"data/cache/{side}/cache.json").write_text(json.dumps({"size": size}))
    code = (
        "import sys\nfrom stages.train import main\nfrom trafficdet.errors import run_stage\n"
        "try:\n    run_stage(main)\nfinally:\n    print('tensorflow imported:', 'tensorflow' in sys.modules)"
    )
    env = {key: value for key, value in stage_env().items() if key != "TF_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: params.yaml train.distribution_strategy: multi_worker_mirrored needs the TF_CONFIG environment variable "
        'on every worker, e.g. TF_CONFIG=\'{"cluster": {"worker": ["host0:2222", "host1:2222"]}, '
        '"task": {"type": "worker", "index": 0}}\' on worker 0 (the chief), index 1 on the other'
    ]
    assert "tensorflow imported: False" in result.stdout


def float_weights(prefix: Path) -> dict[str, np.ndarray]:
    """Every float tensor of a checkpoint (kernels, biases, BatchNorm parameters and statistics)."""
    return {
        name: value
        for name, value in checkpoint_values(prefix).items()
        if isinstance(value, np.ndarray) and value.dtype.kind == "f"
    }


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray], names: list[str] | None = None) -> float:
    """L2 norm of the difference of two checkpoints over ``names`` (default: all their tensors)."""
    return math.sqrt(sum(float(np.sum((a[n].astype(np.float64) - b[n]) ** 2)) for n in names or list(a)))


def init_weights(repo: Path) -> dict[str, np.ndarray]:
    """The starting checkpoint the train stage kept in models/train/init (same layout as float_ckpt)."""
    (index,) = (repo / "models/train/init").glob("*.index")
    return float_weights(index.with_suffix(""))


# A run must move its convolution kernels (all 87 together) by at least this fraction of their
# initial norm. Measured after one epoch of the tiny config (8 steps from the scratch init, one
# device): 0.126. Weight decay alone (l2 3e-5, no gradient) would move them ~1e-6.
MIN_KERNEL_MOVE = 0.02


def assert_valid_training(repo: Path) -> dict:
    """Finite losses, a float checkpoint with every tensor finite that moved away from its init; train.json's summary."""
    summary = json.loads((repo / "models/train/train.json").read_text())
    assert (
        summary["epochs"] == 1
        and math.isfinite(summary["final"]["total_loss"])
        and math.isfinite(summary["final"]["val_total_loss"])
    )
    weights = float_weights(repo / "models/train/float_ckpt")
    assert len(weights) > 100
    assert all(np.isfinite(value).all() for value in weights.values())
    init = init_weights(repo)
    assert init.keys() == weights.keys()
    kernels = [name for name in weights if "kernel" in name]
    zero = dict.fromkeys(kernels, np.zeros(1))
    moved = distance(weights, init, kernels) / distance(init, zero, kernels)
    assert len(kernels) > 50 and moved > MIN_KERNEL_MOVE, f"{len(kernels)} kernels moved {moved:.4f} of their initial norm"
    return summary


# A multi-replica run and a one-device run of the same global batches compute the same step: exactly
# in exact arithmetic (one step from the same weights in float64: relative difference 8e-12,
# bench/experiment_replica_step.py, BENCHMARKS.md). In float32 no run computes it: one device's step
# is 13% from the exact one, the same batch with its halves swapped 11%, two replicas' 10%, each in
# its own direction (the error grows from the head, 4%, down through the BatchNorm layers). Rounding
# turns the step and keeps its length (each within 1% of the exact one), so after the tiny config's
# epoch (7 steps of 4 images):
# - length: |w_run - w_init| / |w_one - w_init| over the kernels is 1 within MAX_LENGTH_ERROR (measured
#   0.9997 for 2 CPU replicas and for 2 workers). SGD's step is linear in the gradient: a 20% scaling
#   error moves it by ~0.2, replicas' gradients summed without rescaling (1.98x, measured) by ~1.
# - direction: |w_run - w_one| / |w_one - w_init| stays below MAX_REPLICA_GAP, float32 rounding's room
#   (measured 0.089 for both; 0.121 was recorded before).
MAX_LENGTH_ERROR = 0.05
MAX_REPLICA_GAP = 0.3


def replica_gap(trained: Path, one_device: Path) -> float:
    """How far ``trained``'s weights are from the one-device run's, relative to how far that run moved from the init."""
    ours, theirs = float_weights(trained / "models/train/float_ckpt"), float_weights(one_device / "models/train/float_ckpt")
    init = init_weights(one_device)
    assert init_weights(trained).keys() == init.keys()
    assert all(np.array_equal(init[name], value) for name, value in init_weights(trained).items()), "different inits"
    return distance(ours, theirs) / distance(theirs, init)


def update_length_ratio(trained: Path, one_device: Path) -> float:
    """How far ``trained``'s kernels moved from the init, over how far the one-device run's did."""
    ours, theirs = float_weights(trained / "models/train/float_ckpt"), float_weights(one_device / "models/train/float_ckpt")
    init = init_weights(one_device)
    kernels = [name for name in init if "kernel" in name]
    return distance(ours, init, kernels) / distance(theirs, init, kernels)


def start_workers(repos: list[Path], commands: list[list[str]], env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """One process per worker of a cluster on 127.0.0.1, worker ``i`` in ``repos[i]``, with ``env`` added."""
    ports = free_ports(len(repos))
    return [
        subprocess.Popen(
            command,
            cwd=repo,
            env={**stage_env(**(env or {})), "TF_CONFIG": tf_config(index, ports)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for index, (repo, command) in enumerate(zip(repos, commands, strict=True))
    ]


def finish_workers(workers: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each worker; any still running after 10 minutes is killed."""
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=600))
    finally:
        for worker in workers:
            if worker.poll() is None:  # a worker that waits for a dead peer waits forever
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
    return [(worker.returncode, out, err) for worker, (out, err) in zip(workers, outputs, strict=True)]


@pytest.fixture(scope="module")
def two_workers(
    cached_repo: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[list[Path], list[subprocess.Popen]]]:
    """A multi_worker_mirrored run of 2 workers on 127.0.0.1, each in its own copy, started in the background.

    Tracing the model is single-threaded Python for most of a run, so on a 2-core machine
    the mirrored test runs beside it: measured 187 s for both, against 158 s + 130 s one
    after the other.
    Worker 0 (the chief) runs `dvc repro train`, worker 1 `python -m stages.train` and keeps
    its copy of models/train in ``<cluster>/kept/worker1`` (KEEP_WORKER_OUTPUTS) to be compared.
    """
    root = tmp_path_factory.mktemp("cluster")
    repos = [copy_of(cached_repo, root / f"worker{index}") for index in range(2)]
    for repo in repos:
        set_param(repo, "train", "distribution_strategy", "multi_worker_mirrored")
    commands = [["dvc", "repro", "train"], [sys.executable, "-m", "stages.train"]]
    workers = start_workers(repos, commands, {KEEP_WORKER_OUTPUTS: str(root / "kept")})
    yield repos, workers
    for worker in workers:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


@pytest.mark.slow
def test_mirrored_over_two_cpu_replicas(
    cached_repo: Path,
    two_workers: tuple[list[Path], list[subprocess.Popen]],  # started first: they train while this test does
    tiny_pipeline: PipelineRun,
    tmp_path: Path,
) -> None:
    repo = copy_of(cached_repo, tmp_path / "repo")
    set_param(repo, "train", "distribution_strategy", "mirrored")
    set_param(repo, "train", "cpu_replicas", 2)
    result = run(["dvc", "repro", "train"], repo)
    assert "on 2 replicas (mirrored)" in result.stdout
    summary = assert_valid_training(repo)
    where = summary["distribution"]
    assert where["class"] == "MirroredStrategy" and where["num_replicas_in_sync"] == 2
    assert [device.rsplit("/", 1)[-1] for device in where["devices"]] == ["device:CPU:0", "device:CPU:1"]
    assert summary["final"]["steps"] == TRAIN_SIZE // 4  # global batches of 4: 2 images per replica
    assert summary["val_images"] == 4  # whole batches only: a partial one could leave a replica empty
    # The session's tiny run trained the same data with the same params on one device.
    ratio, gap = update_length_ratio(repo, tiny_pipeline.repo), replica_gap(repo, tiny_pipeline.repo)
    assert abs(ratio - 1) < MAX_LENGTH_ERROR, f"2 replicas moved the kernels {ratio:.4f}x as far as one device"
    assert gap < MAX_REPLICA_GAP, f"2 replicas ended {gap:.4f} of the one-device update away from it"


@pytest.mark.slow
def test_two_workers_on_loopback(two_workers: tuple[list[Path], list[subprocess.Popen]], tiny_pipeline: PipelineRun) -> None:
    """Both workers finish with the same weights; only the chief wrote the stage's outputs, and they are valid."""
    repos, workers = two_workers
    results = finish_workers(workers)
    for index, (code, out, err) in enumerate(results):
        assert code == 0, f"worker {index} failed ({code}):\n{out}\n{err}"

    chief, other = repos
    summary = assert_valid_training(chief)
    where = summary["distribution"]
    assert where["num_replicas_in_sync"] == 2 and where["workers"] == 2 and where["task"] == "worker 0" and where["chief"]
    assert where["auto_shard"] == "DATA"  # the cache is one TFRecord file: shard by record, not by file
    assert json.loads((chief / "models/train_state/state.json").read_text())["complete"]
    assert (chief / "reports/train/metrics.json").is_file()
    assert "is not the chief: its copy of the outputs was discarded" in results[1][1]
    steps = [line for _, out, _ in results for line in out.splitlines() if line.startswith("train: 1 epochs")]
    assert len(steps) == 2 and all(f"of {summary['final']['steps']} steps" in line for line in steps), steps
    for path in ("models/train", "models/train_state", "reports/train"):
        assert not (other / path).exists(), path
    assert not list((other / "data/.tmp").iterdir()), "the worker's temp copy should be gone"

    # Worker 1 kept its copy of models/train (KEEP_WORKER_OUTPUTS): the same weights, bit for bit.
    kept = other.parent / "kept/worker1"
    assert f"kept its copy of models/train in {kept}" in results[1][1]
    chief_weights, other_weights = float_weights(chief / "models/train/float_ckpt"), float_weights(kept / "float_ckpt")
    assert chief_weights.keys() == other_weights.keys()
    differ = [name for name in chief_weights if not np.array_equal(chief_weights[name], other_weights[name])]
    assert not differ, f"{len(differ)} tensors differ between the workers, e.g. {differ[:3]}"
    ratio, gap = update_length_ratio(chief, tiny_pipeline.repo), replica_gap(chief, tiny_pipeline.repo)
    assert abs(ratio - 1) < MAX_LENGTH_ERROR, f"2 workers moved the kernels {ratio:.4f}x as far as one device"
    assert gap < MAX_REPLICA_GAP, f"2 workers ended {gap:.4f} of the one-device update away from it"


@pytest.mark.slow
def test_workers_that_would_resume_differently_stop_with_one_line(
    cached_repo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chief has a backup after epoch 1, the other worker (own copy) none: both stop before training, clearly."""
    from trafficdet.modelmaker.cache import cache_record
    from trafficdet.params import load
    from trafficdet.resume import fingerprint, owner
    from trafficdet.start import resolve_start

    repos = [copy_of(cached_repo, tmp_path / f"worker{index}") for index in range(2)]
    for repo in repos:
        set_param(repo, "train", "distribution_strategy", "multi_worker_mirrored")
        set_param(repo, "train", "epochs", 2)
    chief = repos[0]
    monkeypatch.chdir(chief)
    cached = [cache_record(side) for side in ("train", "val")]
    params = load(TrainParams)
    state = {"fingerprint": fingerprint(owner(params, cached, resolve_start(params))), "complete": False}
    (chief / "models/train_state/backup/chief").mkdir(parents=True)
    (chief / "models/train_state/state.json").write_text(json.dumps(state))
    (chief / "models/train_state/backup/chief/checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
    (chief / "models/train_state/backup/chief/ckpt-1.index").write_bytes(b"")  # only its name is read before the check

    results = finish_workers(start_workers(repos, [[sys.executable, "-m", "stages.train"]] * 2))
    for index, (code, out, err) in enumerate(results):
        assert code == 1 and "Traceback" not in err, f"worker {index}:\n{out}\n{err}"
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert errors == [
            f"error: models/train_state: this worker would resume after epoch {1 - index}, another worker after a different "
            "one: every worker must see the chief's models/train_state (one repository on a shared folder), or delete it on "
            "the chief to start over"
        ]
    assert not (chief / "models/train").exists()
