"""train: fine-tune Model Maker's object detector on the cached TFRecords, resumably.

Reads data/cache/{train,val} and models/pretrained (or builds a scratch initialisation);
writes
    models/train/           float_ckpt.*, init/ (the
                            starting checkpoint, needed to rebuild the model) and train.json
    models/train_state/     persist: the last finished epoch (Keras BackupAndRestore) and the
                            logged history, so a killed run continues where it stopped
    reports/train/          dvclive: per-epoch train/val losses and learning rate

train.distribution_strategy picks the tf.distribute strategy: off, one_device, mirrored
(several GPUs, or ``cpu_replicas`` logical CPU devices), multi_worker_mirrored (one process
per worker, each with its own ``TF_CONFIG``). Only the chief writes the outputs above; other
workers train in step with it and discard what they write (data/.tmp/).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trafficdet.errors import PipelineError, run_stage
from trafficdet.io import atomic_dir, read_json, write_json
from trafficdet.modelmaker import (
    PRIVATE_TMP,
    build_detector,
    cache_record,
    label_names,
    load_dataset,
    model_spec,
    quiet_tensorflow,
    require_architecture,
    write_scratch_checkpoint,
)
from trafficdet.params import load_section, require_choice, require_positive_int

PRETRAINED_DIR = Path("models/pretrained")
OUT_DIR = Path("models/train")
STATE_DIR = Path("models/train_state")
LIVE_DIR = Path("reports/train")
LOSSES = ("total_loss", "cls_loss", "box_loss", "model_loss")
STRATEGIES = ["off", "one_device", "mirrored", "multi_worker_mirrored"]
TF_CONFIG_EXAMPLE = (
    'TF_CONFIG=\'{"cluster": {"worker": ["host0:2222", "host1:2222"]}, "task": {"type": "worker", "index": 0}}\' '
    "on worker 0 (the chief), index 1 on the other"
)


@dataclass(frozen=True)
class Distribution:
    """How training is spread, worked out from params and TF_CONFIG before TensorFlow starts."""

    strategy: str  # one of STRATEGIES
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


def plan_distribution(params: dict[str, Any]) -> Distribution:
    """Check the strategy params together (and TF_CONFIG for multi-worker); say how many replicas to expect."""
    if params.get("distribution_strategy") is False:  # YAML 1.1 reads an unquoted off as false
        params["distribution_strategy"] = "off"
    strategy = require_choice("train", params, "distribution_strategy", STRATEGIES)
    gpus = params.get("num_gpus", 0)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise PipelineError(f"params.yaml train.num_gpus: must be an integer >= 0, got {gpus!r}")
    params.setdefault("cpu_replicas", 1)
    cpu_replicas = require_positive_int("train", params, "cpu_replicas")
    if cpu_replicas > 1 and (strategy != "mirrored" or gpus):
        raise PipelineError(
            f"params.yaml train.cpu_replicas: {cpu_replicas} logical CPU devices only apply to distribution_strategy: "
            f"mirrored with num_gpus: 0 (got {strategy}, num_gpus {gpus}); set cpu_replicas: 1"
        )
    if strategy in ("off", "one_device") and gpus > 1:
        raise PipelineError(
            f"params.yaml train.num_gpus: {strategy} trains on one device, got num_gpus {gpus}; "
            "use distribution_strategy: mirrored for several GPUs"
        )
    if strategy == "mirrored":
        return Distribution(strategy, gpus or cpu_replicas)
    if strategy == "multi_worker_mirrored":
        workers, task, chief = read_tf_config()
        return Distribution(strategy, workers * max(gpus, 1), workers, task, chief)
    return Distribution(strategy, 1)


def validate(params: dict[str, Any], train_size: int, val_size: int | None = None) -> Distribution:
    """Reject bad params before any TensorFlow work; return how training will be distributed."""
    require_architecture("train", params["architecture"])
    require_choice("train", params, "init", ["pretrained", "scratch"])
    require_positive_int("train", params, "epochs")
    batch = require_positive_int("train", params, "batch_size")
    if batch > train_size:
        raise PipelineError(f"params.yaml train.batch_size: {batch} is larger than the training set ({train_size} images)")
    momentum = params.get("bn_momentum")
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise PipelineError(f"params.yaml train.bn_momentum: must be null or in [0, 1), got {momentum!r}")
    if not float(params["learning_rate"]) > 0:
        raise PipelineError(f"params.yaml train.learning_rate: must be positive, got {params['learning_rate']!r}")
    plan = plan_distribution(params)
    if batch % plan.replicas:
        where = f"{plan.workers} workers" if plan.workers > 1 else plan.strategy
        raise PipelineError(
            f"params.yaml train.batch_size: {batch} does not split evenly over {plan.replicas} replicas ({where}); "
            f"it is the global batch, use a multiple of {plan.replicas}"
        )
    if plan.replicas > 1 and val_size is not None and val_size < batch:
        raise PipelineError(
            f"params.yaml train.batch_size: {batch} is larger than the validation set ({val_size} images); with "
            f"{plan.replicas} replicas validation runs on whole batches only"
        )
    if (params.get("qat") or {}).get("enabled"):
        # Model Maker's quantization_aware_training() fails in this locked stack for every
        # architecture: tfmot raises "Layer conv2dbn_block_N (Conv2DBNBlock) is not supported"
        # (measured for mobilenet_multi_avg and mobilenet_v2). Fail before any training.
        raise PipelineError(
            "params.yaml train.qat.enabled: QAT does not work with the locked Model Maker 0.2.1.4 / tf-models 2.15 / "
            "tfmot stack (tfmot cannot quantize tf-models' Conv2DBNBlock); use export.quantization: int8 "
            "(post-training) instead"
        )
    return plan


def init_checkpoint(params: dict[str, Any], num_classes: int, out: Path) -> None:
    """Put the starting checkpoint in ``out``: the downloaded one, or a seeded scratch one."""
    architecture = params["architecture"]
    if params["init"] == "pretrained":
        manifest = read_json(PRETRAINED_DIR / "manifest.json")
        if manifest.get("pretrained") != architecture:
            raise PipelineError(
                f"train.init is pretrained for {architecture!r} but the download stage fetched "
                f"{manifest.get('pretrained')!r}: set download.pretrained: {architecture}, or train.init: scratch"
            )
        shutil.copytree(PRETRAINED_DIR / architecture, out)
    else:
        write_scratch_checkpoint(model_spec(architecture, out), num_classes, float(params["l2_weight_decay"]), out)


def fingerprint(params: dict[str, Any]) -> str:
    """What a saved training state belongs to: the params and the exact cached data."""
    cached = [cache_record(side) for side in ("train", "val")]
    return hashlib.sha256(json.dumps([params, cached], sort_keys=True).encode()).hexdigest()


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
            f"{STATE_DIR}: this worker would resume after epoch {epochs_done}, another worker after a different one: "
            f"every worker must see the chief's {STATE_DIR} (one repository on a shared folder), "
            "or delete it on the chief to start over"
        )


def make_history_callback(live_dir: Path, history_file: Path, train_images: int):
    """A Keras callback that logs each epoch once to dvclive, also across a resume.

    The history of finished epochs is kept beside the BackupAndRestore backup. On
    (re)start, Keras tells the first epoch it will run; the history is cut to the epochs
    before it and replayed into a fresh dvclive directory, so an epoch that ran but was
    not backed up before a kill is logged once, not twice.
    """
    import tensorflow as tf
    from dvclive import Live

    class EpochHistory(tf.keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.live: Live | None = None
            self.history: list[dict[str, float]] = read_json(history_file) if history_file.exists() else []
            self.started = self.validation_started = 0.0
            self.steps = 0  # batches this process ran in the current epoch: the same on every worker

        def _learning_rate(self) -> float:
            optimizer = self.model.optimizer
            rate = optimizer.learning_rate
            value = rate(optimizer.iterations) if callable(rate) else rate
            return float(tf.keras.backend.get_value(value))  # also a MirroredVariable, under a strategy

        def on_test_begin(self, logs: dict | None = None) -> None:
            self.validation_started = time.perf_counter()  # fit() validates at each epoch's end

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.steps += 1

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = self.validation_started = time.perf_counter()
            self.steps = 0
            if self.live is None:
                self.history = self.history[:epoch]
                shutil.rmtree(live_dir, ignore_errors=True)
                self.live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False)
                for record in self.history:
                    self._log(record)
                if epoch:
                    print(f"train: resuming after epoch {epoch} (from {history_file.parent})")

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            now = time.perf_counter()
            training = (self.validation_started if self.validation_started > self.started else now) - self.started
            record = {
                "epoch": epoch + 1,
                "learning_rate": self._learning_rate(),
                "seconds": now - self.started,
                "steps": self.steps,
                "train_images_per_s": train_images / training,
            }
            for name, value in (logs or {}).items():
                record[name] = float(value)
            self.history.append(record)
            write_json(history_file, self.history, indent=True)  # before the backup is taken
            self._log(record)

        def _log(self, record: dict[str, float]) -> None:
            assert self.live is not None
            for name in LOSSES:
                for prefix, key in (("train", name), ("val", f"val_{name}")):
                    if key in record:
                        self.live.log_metric(f"{prefix}/{name}", record[key])
            self.live.log_metric("learning_rate", record["learning_rate"])
            self.live.log_metric("epoch_seconds", record["seconds"])
            if "train_images_per_s" in record:
                self.live.log_metric("train/images_per_s", record["train_images_per_s"])
            self.live.next_step()

    return EpochHistory()


def create_model_with_bn_momentum(detector: Any, momentum: float | None, replicas: int = 1) -> None:
    """``detector._create_model()`` with another BatchNorm momentum in tf-models' config.

    Setting ``layer.momentum`` after the model is built has no effect on these
    (synchronized) BatchNorm layers: measured, a momentum-0 update moved the moving
    variance by 1%, as 0.99 does. The config's ``norm_momentum`` is read at build time.

    With ``replicas`` > 1 each replica's loss is divided by the replica count before the
    gradient: Model Maker's ``train_step`` does not, and Keras sums the replicas' gradients,
    so N replicas would otherwise take N times the step of one device on the same global batch.
    Measured, one step of 32 images from the same weights: 2 CPU replicas moved the backbone
    and decoder 1.98x as far as one device without the division, 0.99x with it (cosine 0.987).
    """
    import tensorflow as tf
    from mediapipe_model_maker.python.vision.object_detector import model as model_lib

    class Model(model_lib.ObjectDetectorModel):
        def _get_model_config(self, *args: Any, **kwargs: Any) -> Any:
            config = super()._get_model_config(*args, **kwargs)
            if momentum is not None:
                config.norm_activation.norm_momentum = momentum
            return config

        def train_step(self, data: Any) -> Any:
            if replicas == 1:
                return super().train_step(data)
            tf.keras.backend.set_learning_phase(1)  # as Model Maker's train_step, with the loss scaled
            x, y = data
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x, y, y_pred)  # updates the (unscaled) loss metrics
                scaled = loss / replicas
            self._validate_target_and_loss(y, loss)
            self.optimizer.minimize(scaled, self.trainable_variables, tape=tape)
            return self.compute_metrics(x, y, y_pred)

    detector._model = Model(
        model_spec=detector._model_spec, model_options=detector._model_options, num_classes=detector._num_classes
    )


def create_and_train(detector: Any, train_data: Any, val_data: Any, bn_momentum: float | None) -> None:
    """Model Maker's ``_create_and_train_model``, in the strategy's scope, with an optional BatchNorm momentum.

    From scratch, the default momentum (0.99) leaves the moving statistics far behind
    the quickly changing weights: measured on 239 synthetic images after 6 epochs, the
    same batches scored 0.83 loss with batch statistics and 1.85 with the moving ones,
    which is the train/validation gap. A lower momentum (0.9) lets them keep up.
    """
    from mediapipe_model_maker.python.core.utils import model_util

    # Model Maker 0.2.1.4 builds a strategy but never enters it: do it here.
    strategy = detector._hparams.get_strategy()
    replicas = strategy.num_replicas_in_sync if strategy else 1
    with strategy.scope() if strategy else contextlib.nullcontext():
        detector._optimizer = detector._create_optimizer(
            model_util.get_steps_per_epoch(steps_per_epoch=None, batch_size=detector._hparams.batch_size, train_data=train_data)
        )
        with contextlib.redirect_stdout(io.StringIO()):  # Model Maker prints a 100-line model summary
            if bn_momentum is None and replicas == 1:
                detector._create_model()
            else:
                create_model_with_bn_momentum(detector, None if bn_momentum is None else float(bn_momentum), replicas)
        detector._train_model(train_data, val_data, preprocessor=detector._preprocessor)
    detector._save_float_ckpt()  # on every worker: saving reduces BatchNorm's moving statistics over all replicas


def make_strategy(plan: Distribution, params: dict[str, Any]) -> Any:
    """The tf.distribute strategy for ``plan``; call right after importing TensorFlow, before any op.

    Logical CPU devices and MultiWorkerMirroredStrategy's collectives can only be set up
    before TensorFlow's runtime starts, so this cannot wait for Model Maker's HParams.
    """
    import tensorflow as tf
    from official.common import distribute_utils

    gpus = int(params["num_gpus"])
    if plan.strategy == "mirrored" and not gpus:
        # Several logical CPU devices: real multi-replica training (sync BatchNorm, all-reduce) on a CPU machine.
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * plan.replicas)
        devices = [device.name for device in tf.config.list_logical_devices("CPU")]
        # Default cross-device ops: collective all-reduce (RING on CPUs). ReductionToOneDevice links the
        # replicas' graphs, and tracing sync BatchNorm's gradients then walks the other replica's whole
        # graph once per layer: over 15 minutes without finishing the first step here.
        return tf.distribute.MirroredStrategy(devices=devices)
    if gpus and len(tf.config.list_physical_devices("GPU")) < gpus:
        found = len(tf.config.list_physical_devices("GPU"))
        raise PipelineError(f"params.yaml train.num_gpus: {gpus}, but TensorFlow sees {found} GPU(s) on this machine")
    if plan.strategy == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()  # reads TF_CONFIG; waits for every worker
    return distribute_utils.get_distribution_strategy(plan.strategy, num_gpus=gpus)


def strategy_devices(strategy: Any) -> list[str]:
    """The devices replicas run on; empty for the default strategy, which lets TensorFlow place ops."""
    try:
        return list(strategy.extended.worker_devices)
    except RuntimeError:
        return []


def whole_batches(data: Any, batch_size: int) -> None:
    """Cut a dataset to whole batches: a partial last batch can leave a replica with no images.

    The global batch is split in order (7 images over 2 replicas of 16: 7 and 0), and
    Model Maker's model fails on an empty batch ("Incompatible shapes: [32] vs.
    [0,256,256,3]" in a BatchNormalization, measured with batch_size 32 and 7 images).
    Training already runs whole batches only (steps = images // batch_size).
    """
    usable = len(data) - len(data) % batch_size
    data._dataset = data._dataset.take(usable)
    data._size = usable


def shard_across_workers(datasets: list[Any], plan: Distribution, num_shards: int) -> str:
    """Set how tf.data splits each dataset between workers; return the policy's name.

    The default (AUTO) shards by file, and the cache stage writes fewer TFRecord files
    than there are workers (one, by default): then every worker must read all records and
    keep its share (DATA). Same seed on every worker, so their shuffles agree.
    """
    import tensorflow as tf

    if plan.workers == 1:
        return "OFF"
    policy = (
        tf.data.experimental.AutoShardPolicy.FILE if num_shards >= plan.workers else tf.data.experimental.AutoShardPolicy.DATA
    )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy
    for data in datasets:
        data._dataset = data._dataset.with_options(options)
    return policy.name


def train(params: dict[str, Any]) -> dict[str, Any]:
    """Train (resuming if a matching state exists) and write models/train atomically (on the chief only)."""
    train_info = cache_record("train")
    plan = validate(params, train_info["size"], cache_record("val")["size"])
    quiet_tensorflow()
    import tensorflow as tf

    strategy = make_strategy(plan, params)  # first: nothing may touch TensorFlow's runtime before it
    if int(params["batch_size"]) % strategy.num_replicas_in_sync:  # GPUs per worker are only known now
        raise PipelineError(
            f"params.yaml train.batch_size: {params['batch_size']} does not split evenly over the "
            f"{strategy.num_replicas_in_sync} replicas TensorFlow found; use a multiple of {strategy.num_replicas_in_sync}"
        )
    tf.keras.utils.set_random_seed(int(params["seed"]))
    tf.config.experimental.enable_op_determinism()  # identical weights for a fixed seed on CPU

    # Only the chief writes the stage's outputs; another worker's go to a scratch dir, deleted at the end.
    scratch = None if plan.chief else Path(tempfile.mkdtemp(dir=PRIVATE_TMP, prefix=f"train-{plan.task.replace(' ', '')}-"))
    try:
        return run_training(params, plan, strategy, train_info, scratch)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def run_training(params: dict[str, Any], plan: Distribution, strategy: Any, train_info: dict[str, Any], scratch: Path | None):
    """The training itself; ``scratch`` replaces the output folders on a non-chief worker."""
    import tensorflow as tf

    out_dir, state_dir, live_dir = (
        (OUT_DIR, STATE_DIR, LIVE_DIR) if scratch is None else (scratch / "train", scratch / "train_state", scratch / "reports")
    )
    state_id = fingerprint(params)
    marker = STATE_DIR / "state.json"
    saved = read_json(marker) if marker.exists() else {}
    resume = saved.get("fingerprint") == state_id and not saved.get("complete")
    if scratch is None:
        if not resume:
            shutil.rmtree(STATE_DIR, ignore_errors=True)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"fingerprint": state_id, "complete": False}, indent=True)
    elif resume and (STATE_DIR / "backup/chief").exists():
        # Keras restores every worker from <backup>/chief; this worker reads a copy, so that it
        # never writes into models/train_state (which must be shared for the workers to agree).
        shutil.copytree(STATE_DIR / "backup/chief", state_dir / "backup/chief")
        if (STATE_DIR / "history.json").exists():
            shutil.copy2(STATE_DIR / "history.json", state_dir / "history.json")

    if plan.workers > 1:
        check_same_start(strategy, restored_epochs(state_dir / "backup"))

    train_data, val_data = load_dataset("train"), load_dataset("val")
    if strategy.num_replicas_in_sync > 1:
        whole_batches(val_data, int(params["batch_size"]))
    auto_shard = shard_across_workers([train_data, val_data], plan, int(train_info["num_shards"]))
    labels = label_names(train_info)
    hparams = {
        "learning_rate": float(params["learning_rate"]),
        "batch_size": int(params["batch_size"]),
        "epochs": int(params["epochs"]),
        "cosine_decay_epochs": params.get("cosine_decay_epochs"),
        "cosine_decay_alpha": float(params["cosine_decay_alpha"]),
        "shuffle": bool(params["shuffle"]),
        # the strategy is make_strategy()'s; HParams would build a second one
        "distribution_strategy": "off",
        "num_gpus": 0,
    }
    with atomic_dir(out_dir) as out:
        init_checkpoint(params, len(labels), out / "init")
        detector = build_detector(params["architecture"], out / "init", labels, hparams, float(params["l2_weight_decay"]), out)
        detector._hparams._strategy = strategy
        history = make_history_callback(live_dir, state_dir / "history.json", train_info["size"])
        backup = tf.keras.callbacks.BackupAndRestore(str(state_dir / "backup"))
        detector._callbacks = [history, backup]  # Model Maker's fit() takes its callbacks from here
        started = time.perf_counter()
        create_and_train(detector, train_data, val_data, params.get("bn_momentum"))  # writes out/float_ckpt
        summary = {
            "architecture": params["architecture"],
            "init": params["init"],
            "labels": labels,  # background first, as the model outputs them
            "classes": labels[1:],
            "l2_weight_decay": float(params["l2_weight_decay"]),
            "epochs": len(history.history),
            "train_images": train_info["size"],
            "val_images": len(val_data),
            "seconds": round(time.perf_counter() - started, 1),
            "distribution": {
                "strategy": plan.strategy,
                "class": type(strategy).__name__,
                "num_replicas_in_sync": strategy.num_replicas_in_sync,
                "devices": strategy_devices(strategy),
                "workers": plan.workers,
                "task": plan.task,
                "chief": plan.chief,
                "auto_shard": auto_shard,
            },
            "final": history.history[-1] if history.history else {},
        }
        write_json(out / "train.json", summary, indent=True)
    if scratch is None:
        write_json(marker, {"fingerprint": state_id, "complete": True}, indent=True)
        shutil.rmtree(STATE_DIR / "backup", ignore_errors=True)
    return summary


def main() -> None:
    summary = train(load_section("train"))
    final, where = summary["final"], summary["distribution"]
    scale = f" on {where['num_replicas_in_sync']} replicas ({where['strategy']})" if where["num_replicas_in_sync"] > 1 else ""
    print(
        f"train: {summary['epochs']} epochs of {final.get('steps', '?')} steps in {summary['seconds']} s{scale}; "
        f"loss {final.get('total_loss', float('nan')):.3f}, val loss {final.get('val_total_loss', float('nan')):.3f}"
    )
    if not where["chief"]:
        print(f"train: {where['task']} is not the chief: its copy of the outputs was discarded (the chief writes {OUT_DIR})")


if __name__ == "__main__":
    run_stage(main)
