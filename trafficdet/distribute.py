"""How training is spread: tf.distribute strategy, replicas, workers (TF_CONFIG) and who writes.

``train.distribution_strategy``: off, one_device, mirrored (several GPUs, or ``cpu_replicas``
logical CPU devices), multi_worker_mirrored (one process per worker, each with its own
``TF_CONFIG``). Everything that can be checked is checked before TensorFlow starts: the keys
among themselves when params.yaml is loaded (TrainParams), TF_CONFIG and the data sizes here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trafficdet.errors import PipelineError
from trafficdet.params import TrainParams
from trafficdet.paths import TRAIN_LIVE, TRAIN_STATE, TRAIN_TIMING, TRAINED

# A folder where a non-chief worker keeps its copy of models/train instead of deleting it, to check
# that the workers trained in step (the test does). Unset: the copy is deleted, as the chief's is the output.
KEEP_WORKER_OUTPUTS = "TRAFFICDET_KEEP_WORKER_OUTPUTS"

TF_CONFIG_EXAMPLE = (
    'TF_CONFIG=\'{"cluster": {"worker": ["host0:2222", "host1:2222"]}, "task": {"type": "worker", "index": 0}}\' '
    "on worker 0 (the chief), index 1 on the other"
)


@dataclass(frozen=True)
class Distribution:
    """How training is spread, worked out from params and TF_CONFIG before TensorFlow starts."""

    strategy: str  # train.distribution_strategy
    replicas: int  # expected num_replicas_in_sync
    workers: int = 1
    task: str = "chief"  # "worker 1", ...: printed and recorded
    chief: bool = True  # only the chief writes models/train, models/train_state, reports/train


def read_tf_config() -> tuple[int, str, bool]:
    """(number of workers, this task's name, is it the chief) from ``TF_CONFIG``, with one-line errors."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        raise PipelineError(
            "params.yaml train.distribution_strategy: multi_worker_mirrored needs the TF_CONFIG environment "
            f"variable on every worker, e.g. {TF_CONFIG_EXAMPLE}"
        )
    try:
        config = json.loads(raw)
    except ValueError as err:
        raise PipelineError(f"TF_CONFIG: not valid JSON ({err}); e.g. {TF_CONFIG_EXAMPLE}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise PipelineError(f"TF_CONFIG: needs a 'cluster' and a 'task' object; e.g. {TF_CONFIG_EXAMPLE}")
    if set(cluster) - {"chief", "worker"}:
        raise PipelineError(
            f"TF_CONFIG: cluster has {sorted(set(cluster) - {'chief', 'worker'})}; "
            "multi_worker_mirrored takes only 'chief' and 'worker' tasks"
        )
    hosts = {kind: cluster.get(kind, []) for kind in ("chief", "worker")}
    if not all(isinstance(h, list) and all(isinstance(x, str) and ":" in x for x in h) for h in hosts.values()):
        raise PipelineError("TF_CONFIG: cluster.chief and cluster.worker must be lists of 'host:port' strings")
    if len(hosts["chief"]) > 1:
        raise PipelineError(f"TF_CONFIG: cluster.chief lists {len(hosts['chief'])} hosts; there is at most one chief")
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in ("chief", "worker") or isinstance(index, bool) or not isinstance(index, int):
        raise PipelineError(f"TF_CONFIG: task must be {{'type': 'chief' or 'worker', 'index': N}}, got {task}")
    if not 0 <= index < len(hosts[kind]):
        raise PipelineError(f"TF_CONFIG: task {kind} {index} is not in cluster.{kind} ({len(hosts[kind])} hosts)")
    chief = kind == "chief" or (not hosts["chief"] and index == 0)
    return len(hosts["chief"]) + len(hosts["worker"]), f"{kind} {index}", chief


def plan_distribution(params: TrainParams) -> Distribution:
    """How many replicas to expect, and (multi-worker) this task's place from TF_CONFIG.

    The strategy keys among themselves were checked when params.yaml was loaded (TrainParams).
    """
    strategy = params.distribution_strategy
    if strategy == "multi_worker_mirrored":
        workers, task, chief = read_tf_config()
        return Distribution(strategy, workers * params.machine_replicas(), workers, task, chief)
    return Distribution(strategy, params.machine_replicas())


def check_batches(params: TrainParams, plan: Distribution, val_size: int) -> None:
    """The global batch must split evenly over every worker's replicas, and validation must fill one batch.

    One machine's replicas were checked at load (TrainParams); how many workers there are is TF_CONFIG's.
    """
    batch = params.batch_size
    if batch % plan.replicas:
        where = f"{plan.workers} workers" if plan.workers > 1 else plan.strategy
        raise PipelineError(
            f"params.yaml train.batch_size: {batch} does not split evenly over {plan.replicas} replicas ({where}); "
            f"it is the global batch, use a multiple of {plan.replicas}"
        )
    if plan.replicas > 1 and val_size < batch:
        raise PipelineError(
            f"params.yaml train.batch_size: {batch} is larger than the validation set ({val_size} images); with "
            f"{plan.replicas} replicas validation runs on whole batches only"
        )


def make_strategy(plan: Distribution, params: TrainParams) -> Any:
    """The tf.distribute strategy for ``plan``; call right after importing TensorFlow, before any op.

    Logical CPU devices and MultiWorkerMirroredStrategy's collectives can only be set up
    before TensorFlow's runtime starts, so this cannot wait for Model Maker's HParams.
    """
    import tensorflow as tf
    from official.common import distribute_utils

    gpus = params.num_gpus
    if plan.strategy == "mirrored" and not gpus:
        # Several logical CPU devices: real multi-replica training (sync BatchNorm, all-reduce) on a CPU machine.
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * plan.replicas)
        devices = [device.name for device in tf.config.list_logical_devices("CPU")]
        # Default cross-device ops: collective all-reduce (RING on CPUs). ReductionToOneDevice links the
        # replicas' graphs, and tracing sync BatchNorm's gradients then walks the other replica's whole
        # graph once per layer: over 15 minutes without finishing the first step here.
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    else:
        found = len(tf.config.list_physical_devices("GPU"))
        if gpus and found < gpus:
            raise PipelineError(f"params.yaml train.num_gpus: {gpus}, but TensorFlow sees {found} GPU(s) on this machine")
        if plan.strategy == "multi_worker_mirrored":
            strategy = tf.distribute.MultiWorkerMirroredStrategy()  # reads TF_CONFIG; waits for every worker
        else:
            strategy = distribute_utils.get_distribution_strategy(plan.strategy, num_gpus=gpus)
    if params.batch_size % strategy.num_replicas_in_sync:  # GPUs per worker are only known now
        replicas = strategy.num_replicas_in_sync
        raise PipelineError(
            f"params.yaml train.batch_size: {params.batch_size} does not split evenly over the "
            f"{replicas} replicas TensorFlow found; use a multiple of {replicas}"
        )
    return strategy


def strategy_devices(strategy: Any) -> list[str]:
    """The devices replicas run on; empty for the default strategy, which lets TensorFlow place ops."""
    try:
        return list(strategy.extended.worker_devices)
    except RuntimeError:
        return []


def auto_shard_options(plan: Distribution, num_shards: int) -> tuple[Any, str]:
    """How tf.data splits each dataset between workers: (``tf.data.Options`` or None, the policy's name).

    The default (AUTO) shards by file, and the cache stage writes fewer TFRecord files
    than there are workers (one, by default): then every worker must read all records and
    keep its share (DATA). Same seed on every worker, so their shuffles agree.
    """
    import tensorflow as tf

    if plan.workers == 1:
        return None, "OFF"
    policy = tf.data.experimental.AutoShardPolicy
    chosen = policy.FILE if num_shards >= plan.workers else policy.DATA
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = chosen
    return options, chosen.name


def restored_epochs(backup_dir: Path) -> int:
    """How many epochs Keras' BackupAndRestore will restore: the N of its last ``chief/ckpt-N`` (one per epoch)."""
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(backup_dir / "chief"))
    return int(latest.rsplit("-", 1)[1]) if latest else 0


def check_same_start(strategy: Any, epochs_done: int) -> None:
    """Fail on every worker unless all of them resume after the same epoch.

    Keras restores each worker from ``<backup>/chief``. A worker that cannot see the
    chief's models/train_state starts over while the chief resumes, and their collective
    ops no longer pair up: measured, TensorFlow aborts both with "Collective instance 1000
    expected type 1 and data_type 9 but got type 0". This all-reduce runs first, so the
    error says what to do.
    """
    import tensorflow as tf

    total = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(float(epochs_done))), axis=None)
    if float(total) != epochs_done * strategy.num_replicas_in_sync:
        raise PipelineError(
            f"{TRAIN_STATE}: this worker would resume after epoch {epochs_done}, another worker after a different one: "
            f"every worker must see the chief's {TRAIN_STATE} (one repository on a shared folder), "
            "or delete it on the chief to start over"
        )


@dataclass(frozen=True)
class Folders:
    """Where this task writes the train stage's outputs: the real ones on the chief, throwaway ones elsewhere."""

    train: Path  # models/train
    state: Path  # models/train_state
    live: Path  # reports/train
    timing: Path  # reports/timing/train
    discard: Path | None = None  # a non-chief worker's throwaway folder, holding the four above; None on the chief


@contextmanager
def output_folders(plan: Distribution) -> Iterator[Folders]:
    """The chief's outputs are the stage's; another worker's go to a throwaway folder, deleted on exit.

    Every worker must write what the chief writes (Keras saves on all of them), but only the chief's is kept.
    """
    if plan.chief:
        yield Folders(TRAINED, TRAIN_STATE, TRAIN_LIVE, TRAIN_TIMING)
        return
    discard = Path(tempfile.mkdtemp(prefix=f"discard-train-{plan.task.replace(' ', '')}-"))  # under data/.tmp
    try:
        yield Folders(discard / "train", discard / "state", discard / "live", discard / "timing", discard)
    finally:
        kept = discard_worker_outputs(discard, plan.task)
        if kept is not None:
            print(f"train: {plan.task} kept its copy of {TRAINED} in {kept}")


def discard_worker_outputs(discard: Path, task: str) -> Path | None:
    """Delete a non-chief worker's throwaway folder; with $TRAFFICDET_KEEP_WORKER_OUTPUTS set, first move its
    models/train copy to ``<that folder>/<task>`` and return where it went."""
    keep = os.environ.get(KEEP_WORKER_OUTPUTS, "").strip()
    kept = None
    if keep and (discard / "train").is_dir():
        kept = Path(keep) / task.replace(" ", "")
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(kept, ignore_errors=True)
        shutil.move(discard / "train", kept)
    shutil.rmtree(discard, ignore_errors=True)
    return kept
