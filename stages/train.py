"""train: fine-tune Model Maker's object detector on the cached TFRecords, resumably.

Reads data/cache/{train,val} and models/pretrained (a Model Maker COCO checkpoint, Keras' ImageNet
MobileNetV2 for the backbone, or nothing: a seeded scratch initialisation); writes
    models/train/           float_ckpt.*, init/ (the start, needed to rebuild the model), train.json,
                            and with train.qat.enabled qat_ckpt.* (export.quantization: qat_int8 reads it)
    models/train_state/     persist: the last finished epoch and history (a killed run goes on from there),
                            the float checkpoint once done (a kill in QAT reruns QAT only), copied to resume_remote
    reports/train/          dvclive: per-epoch train/val losses and learning rate
    reports/timing/train/   dvclive: per-epoch seconds, images/s and the device line (measurements)

With multi_worker_mirrored only the chief writes these; another worker's go to a discarded folder.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trafficdet.modelmaker.build as build  # module paths: the package __init__ is not a declared dep
import trafficdet.modelmaker.cache as cache
import trafficdet.modelmaker.qat as qat
import trafficdet.modelmaker.training as training
from trafficdet.architectures import IMAGENET
from trafficdet.device import device_line, use_device
from trafficdet.distribute import (
    Distribution,
    Folders,
    auto_shard_options,
    check_batches,
    check_same_start,
    make_strategy,
    output_folders,
    plan_distribution,
    restored_epochs,
    strategy_devices,
)
from trafficdet.errors import PipelineError, run_stage
from trafficdet.history import make_history_callback
from trafficdet.imagenet import copy_into_backbone
from trafficdet.io import atomic_dir, write_json
from trafficdet.params import TrainParams, load
from trafficdet.paths import TRAIN_STATE, TRAINED
from trafficdet.resume import checked_remote, keep_float_phase, mark_complete, owner, prepare_state
from trafficdet.resume_remote import ResumeRemote, make_push_callback, push_or_warn
from trafficdet.start import Start, leakage_warning, resolve_start


@dataclass(frozen=True)
class Data:
    """The cached datasets as the model reads them, their labels and how tf.data splits them between workers."""

    train: Any  # Model Maker DataLoaders
    val: Any
    labels: list[str]  # background first, as the model outputs them
    auto_shard: str


def train(params: TrainParams) -> dict[str, Any]:
    """Train (resuming if a matching state exists) and write models/train atomically (on the chief only)."""
    # Checks: params.yaml's keys among themselves were checked at load; data, TF_CONFIG and the start point here.
    train_info, val_info = cache.cache_record("train"), cache.cache_record("val")
    plan, start = validate(params, train_info["size"], val_info["size"])
    current = owner(params, [train_info, val_info], start)
    remote = checked_remote(params, plan.chief, current)

    # TensorFlow: the device line first, then the leakage warning, seeding and determinism.
    strategy, device = start_tensorflow(params, plan, leakage_warning(params, start, val_info))

    # Resume state: only the chief writes the stage's outputs; another worker's are thrown away on exit.
    with output_folders(plan) as folders:
        marker, float_done = prepare_state(current, folders.discard, folders.state, remote)
        pusher = remote if plan.chief else None  # only the chief copies its state out
        epochs_done = restored_epochs(folders.state / "backup")
        if plan.workers > 1:
            check_same_start(strategy, epochs_done)

        # Data.
        data = load_data(params, plan, strategy, train_info)

        with atomic_dir(folders.train) as out:
            # Model.
            detector = make_detector(params, start, data.labels, strategy, out)
            history = set_callbacks(detector, params, folders, train_info["size"], device, pusher)

            # The float phase (unless a killed run finished it), then quantization-aware training.
            started = time.perf_counter()
            train_float(detector, params, data, out, history, float_done, epochs_done)
            qat_log = train_qat(detector, params, data, out, marker, float_done, pusher) if params.qat.enabled else None

            # Outputs: train.json without the measurements; the chief's state is finished.
            summary = summarize(params, start, data, train_info["size"], plan, strategy, detector, history, qat_log)
            write_summary(out, summary)
        if plan.chief:  # a finished run: its resume state goes, and the next run may replace the remote copy
            mark_complete(marker)
            if pusher:
                push_or_warn(pusher, TRAIN_STATE, params.epochs)
    return {**summary, "seconds": round(time.perf_counter() - started, 1)}


def validate(params: TrainParams, train_size: int, val_size: int) -> tuple[Distribution, Start]:
    """Reject what params.yaml cannot check alone, before any TensorFlow work; return the plan and the start point."""
    for key, batch in (("batch_size", params.batch_size), ("qat.batch_size", params.qat.batch_size)):
        if batch > train_size and (key == "batch_size" or params.qat.enabled):
            raise PipelineError(f"params.yaml train.{key}: {batch} is larger than the training set ({train_size} images)")
    plan = plan_distribution(params)  # TF_CONFIG first: it is the one a multi-worker user meets first
    start = resolve_start(params)
    check_batches(params, plan, val_size)
    if params.qat.enabled and (plan.replicas > 1 or plan.workers > 1):  # several workers (one machine: at load)
        raise PipelineError(
            f"params.yaml train.qat.enabled: QAT runs on one device only (distribution_strategy {plan.strategy} "
            f"gives {plan.replicas} replicas); set train.distribution_strategy: off or one_device, or qat.enabled: false"
        )
    return plan, start


def start_tensorflow(params: TrainParams, plan: Distribution, warning: str | None) -> tuple[Any, str]:
    """Import TensorFlow on train.device's device, print the device line first, then the warning; seed it."""
    cache.quiet_tensorflow()
    import tensorflow as tf

    use_device(params)  # stops if nvidia-smi lists a GPU TensorFlow cannot use; hides GPUs for train.device: cpu
    strategy = make_strategy(plan, params)  # no op may run before it (use_device only configures)
    device = device_line(strategy, params, plan)
    print(f"train: {device}", flush=True)  # the first line: what it trains on
    if warning and plan.chief:
        print(warning, flush=True)
    if params.mixed_precision == "float16" and not tf.config.list_physical_devices("GPU"):
        raise PipelineError(
            "params.yaml train.mixed_precision: float16 needs a GPU (TensorFlow sees none here); "
            "use off, or bfloat16 (runs on a CPU, slowly)"
        )
    tf.keras.utils.set_random_seed(params.seed)
    tf.config.experimental.enable_op_determinism()  # identical weights for a fixed seed on CPU
    return strategy, device


def load_data(params: TrainParams, plan: Distribution, strategy: Any, train_info: dict[str, Any]) -> Data:
    """The cached train and val sets, whole batches only with several replicas, sharded between workers."""
    train_data, val_data = cache.load_dataset("train"), cache.load_dataset("val")
    if strategy.num_replicas_in_sync > 1:
        training.whole_batches(val_data, params.batch_size)
    options, auto_shard = auto_shard_options(plan, int(train_info["num_shards"]))
    if options is not None:
        for data in (train_data, val_data):
            training.set_dataset_options(data, options)
    return Data(train_data, val_data, cache.label_names(train_info), auto_shard)


def init_checkpoint(start: Start, params: TrainParams, num_classes: int, out: Path) -> None:
    """Put the starting checkpoint in ``out`` (Model Maker's layout)."""
    if start.coco_trained:  # a Model Maker COCO checkpoint, as downloaded
        shutil.copytree(start.weights, out)
        return
    spec = build.model_spec(params.architecture, out)
    network = build.build_network(spec, num_classes, params.l2_weight_decay)  # decoder and head start here in both cases
    if start.name == IMAGENET:
        copy_into_backbone(start.weights, network.backbone)
    build.write_init_checkpoint(network, spec, out)


def make_detector(params: TrainParams, start: Start, labels: list[str], strategy: Any, out: Path) -> Any:
    """Model Maker's detector, built from the starting checkpoint (written to ``out/init``) under ``strategy``."""
    init_checkpoint(start, params, len(labels), out / "init")
    hparams = {
        "learning_rate": params.learning_rate,
        "batch_size": params.batch_size,
        "epochs": params.epochs,
        "cosine_decay_epochs": params.cosine_decay_epochs,
        "cosine_decay_alpha": params.cosine_decay_alpha,
        "shuffle": params.shuffle,
        "distribution_strategy": "off",  # the strategy is make_strategy()'s; HParams would build a second one
        "num_gpus": 0,
    }
    detector = build.build_detector(params.architecture, out / "init", labels, hparams, params.l2_weight_decay, out)
    training.set_strategy(detector, strategy)
    return detector


def set_callbacks(
    detector: Any, params: TrainParams, folders: Folders, train_size: int, device: str, pusher: ResumeRemote | None
) -> Any:
    """Log every epoch (dvclive, history), back it up, copy it out (resume_remote); return the history."""
    import tensorflow as tf

    history = make_history_callback(
        folders.live, folders.timing, folders.state / "history.json", train_size, params.epochs, params.batch_size, device
    )
    callbacks = [history, tf.keras.callbacks.BackupAndRestore(str(folders.state / "backup"))]
    training.set_callbacks(detector, callbacks + ([make_push_callback(pusher, folders.state)] if pusher else []))
    return history


def train_float(
    detector: Any, params: TrainParams, data: Data, out: Path, history: Any, float_done: bool, epochs_done: int
) -> None:
    """The float phase into ``out/float_ckpt``, or, if a killed run finished it, its kept checkpoint restored."""
    if not float_done:
        training.create_and_train(  # writes out/float_ckpt
            detector, data.train, data.val, params.bn_momentum, params.mixed_precision, params.jit_compile, epochs_done
        )
        return
    print(f"train: the float phase finished before the run stopped (kept in {TRAIN_STATE}); running QAT again")
    history.replay()
    for file in TRAIN_STATE.glob("float_ckpt.*"):
        shutil.copy2(file, out / file.name)
    training.restore_trained_float(detector, data.train, out / "float_ckpt", params.bn_momentum, params.jit_compile)


def train_qat(
    detector: Any, params: TrainParams, data: Data, out: Path, marker: Path, float_done: bool, pusher: ResumeRemote | None
) -> list[dict[str, Any]]:
    """Quantization-aware training into ``out/qat_ckpt``, after keeping the float phase (a kill reruns only QAT)."""
    import tensorflow as tf

    if not float_done:
        keep_float_phase(out, marker)
        if pusher:
            push_or_warn(pusher, TRAIN_STATE, params.epochs)
    tf.keras.utils.set_random_seed(params.seed)  # the same QAT after a kill as in one go
    settings = params.qat
    qat_log = qat.quantization_aware_training(
        detector,
        data.train,
        data.val,
        epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
        alpha=params.cosine_decay_alpha,
    )
    qat.qat_checkpoint(detector).write(str(out / "qat_ckpt"))
    return qat_log


def summarize(
    params: TrainParams,
    start: Start,
    data: Data,
    train_size: int,
    plan: Distribution,
    strategy: Any,
    detector: Any,
    history: Any,
    qat_log: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    """What was trained, from what, on what and how far: train.json's content, measurements included."""
    return {
        "architecture": params.architecture,
        "init": params.init,
        "start_point": start.name,  # scratch, mobilenet_v2_imagenet or a Model Maker COCO checkpoint
        "labels": data.labels,  # background first, as the model outputs them
        "classes": data.labels[1:],
        "l2_weight_decay": params.l2_weight_decay,
        "epochs": len(history.history),
        "train_images": train_size,
        "val_images": len(data.val),
        "distribution": {
            "strategy": plan.strategy,
            "class": type(strategy).__name__,
            "num_replicas_in_sync": strategy.num_replicas_in_sync,
            "devices": strategy_devices(strategy),
            "workers": plan.workers,
            "task": plan.task,
            "chief": plan.chief,
            "auto_shard": data.auto_shard,
        },
        "speed": training.speed_settings(detector),
        "final": history.history[-1] if history.history else {},
        "qat": None if qat_log is None else {**params.qat.model_dump(exclude={"enabled"}), "history": qat_log},
    }


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """train.json: the summary without the per-run measurements (seconds, images/s), which live in reports/timing."""
    final = {key: value for key, value in summary["final"].items() if key not in ("seconds", "train_images_per_s")}
    write_json(out / "train.json", {**summary, "final": final}, indent=True)


def main() -> None:
    summary = train(load(TrainParams))
    final, where = summary["final"], summary["distribution"]
    scale = f" on {where['num_replicas_in_sync']} replicas ({where['strategy']})" if where["num_replicas_in_sync"] > 1 else ""
    print(
        f"train: {summary['epochs']} epochs of {final.get('steps', '?')} steps in {summary['seconds']} s{scale}; "
        f"loss {final.get('total_loss', float('nan')):.3f}, val loss {final.get('val_total_loss', float('nan')):.3f}"
    )
    if summary["qat"]:
        last = summary["qat"]["history"][-1]
        print(
            f"train: QAT {summary['qat']['epochs']} epochs; loss {last['total_loss']:.3f}, val loss {last['val_total_loss']:.3f}"
        )
    if not where["chief"]:
        print(f"train: {where['task']} is not the chief: its copy of the outputs was discarded (the chief writes {TRAINED})")


if __name__ == "__main__":
    run_stage(main)
