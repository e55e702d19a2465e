"""train: fine-tune Model Maker's object detector on the cached TFRecords, resumably.

Reads data/cache/{train,val} and models/pretrained (a Model Maker COCO checkpoint, Keras'
ImageNet MobileNetV2 for the backbone, or nothing for a seeded scratch initialisation); writes
    models/train/           float_ckpt.*, init/ (the starting checkpoint, needed to rebuild
                            the model), train.json and, with train.qat.enabled, qat_ckpt.*
                            (the quantization-aware fine-tune export.quantization: qat_int8 reads)
    models/train_state/     persist: the last finished epoch (Keras BackupAndRestore) and the
                            logged history, so a killed run continues where it stopped; once
                            the float phase is done, its checkpoint (a kill during QAT reruns
                            only the QAT phase); with train.resume_remote also copied to durable
                            storage after every epoch, and restored from there into a fresh clone
    reports/train/          dvclive: per-epoch train/val losses and learning rate
    reports/timing/train/   dvclive: per-epoch seconds and training images/s, and the device line (measurements)

With train.distribution_strategy: multi_worker_mirrored only the chief writes these; other
workers train in step with it and discard what they write (trafficdet/distribute.py).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import trafficdet.modelmaker as mm
from trafficdet.architectures import IMAGENET, START_POINTS
from trafficdet.device import check_device_params, device_line, use_device
from trafficdet.distribute import (
    Distribution,
    auto_shard_options,
    check_batches,
    check_same_start,
    discard_worker_outputs,
    make_strategy,
    plan_distribution,
    restored_epochs,
    strategy_devices,
)
from trafficdet.errors import PipelineError, run_stage
from trafficdet.history import make_history_callback
from trafficdet.imagenet import copy_into_backbone
from trafficdet.io import atomic_dir, read_json, write_json
from trafficdet.params import TrainParams, load
from trafficdet.paths import PRETRAINED, TRAIN_LIVE, TRAIN_STATE, TRAIN_TIMING, TRAINED
from trafficdet.resume import check_remote, fingerprint, keep_float_phase, mark_complete, owner, prepare_state
from trafficdet.resume_remote import ResumeRemote, make_push_callback, push_or_warn


def validate(params: TrainParams, train_size: int, val_size: int) -> Distribution:
    """Reject what params.yaml cannot check alone, before any TensorFlow work; return the plan."""
    for key, batch in (("batch_size", params.batch_size), ("qat.batch_size", params.qat.batch_size)):
        if batch > train_size and (key == "batch_size" or params.qat.enabled):
            raise PipelineError(f"params.yaml train.{key}: {batch} is larger than the training set ({train_size} images)")
    plan = plan_distribution(params)  # TF_CONFIG first: it is the one a multi-worker user meets first
    check_device_params(params)
    start_point(params)
    check_batches(params, plan, val_size)
    if params.qat.enabled and params.mixed_precision != "off":
        raise PipelineError(
            f"params.yaml train.qat.enabled: QAT with train.mixed_precision: {params.mixed_precision} is not supported "
            "(fake-quantization is float32); set mixed_precision: off for a QAT run"
        )
    if params.qat.enabled and (plan.replicas > 1 or plan.workers > 1):
        raise PipelineError(
            f"params.yaml train.qat.enabled: QAT runs on one device only (distribution_strategy {plan.strategy} "
            f"gives {plan.replicas} replicas); set train.distribution_strategy: off or one_device, or qat.enabled: false"
        )
    return plan


def leakage_warning(params: TrainParams, val_record: dict[str, Any]) -> str | None:
    """One line when a COCO-trained start point is validated on COCO train2017 images it was trained on.

    Model Maker's checkpoints were trained on COCO train2017 (the ImageNet backbone and scratch
    saw none of it); the cache stage records where the validation images come from.
    """
    seen = val_record.get("origins", {}).get("train2017", 0)
    if start_point(params) in ("scratch", IMAGENET) or not seen:
        return None
    return (
        f"train: warning: {seen} of {val_record['size']} validation images are from COCO train2017, which the pretrained "
        f"{params.architecture} checkpoint was trained on: validation loss and AP are optimistic and not comparable "
        "with published COCO figures (split.method: coco validates on val2017 only)"
    )


def start_point(params: TrainParams) -> str:
    """What training starts from: ``scratch`` or the download stage's start point, which must fit the architecture."""
    if params.init == "scratch":
        return "scratch"
    fetched = read_json(PRETRAINED / "manifest.json").get("pretrained")
    point = START_POINTS.get(fetched)
    if point is None or params.architecture not in point.fits:
        fitting = " or ".join(name for name, p in START_POINTS.items() if params.architecture in p.fits)
        fits = f" (it fits {' and '.join(point.fits)})" if point else ""
        raise PipelineError(
            f"params.yaml train.init: pretrained {params.architecture!r}, but the download stage fetched {fetched!r}"
            f"{fits}: set download.pretrained: {fitting}, or train.init: scratch"
        )
    return fetched


def init_checkpoint(params: TrainParams, num_classes: int, out: Path) -> str:
    """Put the starting checkpoint in ``out`` (Model Maker's layout); return the start point's name."""
    start = start_point(params)
    if start not in ("scratch", IMAGENET):  # a Model Maker COCO checkpoint, as downloaded
        shutil.copytree(PRETRAINED / start, out)
        return start
    spec = mm.model_spec(params.architecture, out)
    network = mm.build_network(spec, num_classes, params.l2_weight_decay)  # decoder and head start here in both cases
    if start == IMAGENET:
        copy_into_backbone(PRETRAINED / read_json(PRETRAINED / "manifest.json")["file"], network.backbone)
    mm.write_init_checkpoint(network, spec, out)
    return start


def train(params: TrainParams) -> dict[str, Any]:
    """Train (resuming if a matching state exists) and write models/train atomically (on the chief only)."""
    # Config: everything checkable is checked before TensorFlow starts.
    train_info, val_info = mm.cache_record("train"), mm.cache_record("val")
    plan = validate(params, train_info["size"], val_info["size"])
    warning = leakage_warning(params, val_info)
    current = owner(params, [train_info, val_info])
    remote = ResumeRemote(params.resume_remote) if params.resume_remote else None
    if remote and plan.chief:  # bad credentials, an unmounted drive, another run's state: before TensorFlow starts
        remote.check_writable()
        check_remote(remote, fingerprint(current), current)
    mm.quiet_tensorflow()
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

    # Only the chief writes the stage's outputs; another worker's go to a scratch dir, deleted at the end.
    scratch = None if plan.chief else Path(tempfile.mkdtemp(prefix=f"train-{plan.task.replace(' ', '')}-"))  # data/.tmp/<pid>
    out_dir, state_dir, live_dir, timing_dir = (
        (TRAINED, TRAIN_STATE, TRAIN_LIVE, TRAIN_TIMING)
        if scratch is None
        else (scratch / "train", scratch / "state", scratch / "live", scratch / "timing")
    )
    try:
        marker, float_done = prepare_state(current, scratch, state_dir, remote)
        pusher = remote if scratch is None else None  # only the chief copies its state out
        epochs_done = restored_epochs(state_dir / "backup")
        if plan.workers > 1:
            check_same_start(strategy, epochs_done)

        # Data.
        train_data, val_data = mm.load_dataset("train"), mm.load_dataset("val")
        if strategy.num_replicas_in_sync > 1:
            mm.whole_batches(val_data, params.batch_size)
        options, auto_shard = auto_shard_options(plan, int(train_info["num_shards"]))
        if options is not None:
            for data in (train_data, val_data):
                mm.set_dataset_options(data, options)
        labels = mm.label_names(train_info)

        with atomic_dir(out_dir) as out:
            # Model.
            start = init_checkpoint(params, len(labels), out / "init")
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
            detector = mm.build_detector(params.architecture, out / "init", labels, hparams, params.l2_weight_decay, out)
            mm.set_strategy(detector, strategy)
            history = make_history_callback(
                live_dir, timing_dir, state_dir / "history.json", train_info["size"], params.epochs, params.batch_size, device
            )
            callbacks = [history, tf.keras.callbacks.BackupAndRestore(str(state_dir / "backup"))]
            mm.set_callbacks(detector, callbacks + ([make_push_callback(pusher, state_dir)] if pusher else []))

            # Loop: the float phase (unless a killed run finished it), then quantization-aware training.
            started = time.perf_counter()
            if float_done:
                print(f"train: the float phase finished before the run stopped (kept in {TRAIN_STATE}); running QAT again")
                history.replay()
                for file in TRAIN_STATE.glob("float_ckpt.*"):
                    shutil.copy2(file, out / file.name)
                mm.restore_trained_float(detector, train_data, out / "float_ckpt", params.bn_momentum, params.jit_compile)
            else:
                mm.create_and_train(  # writes out/float_ckpt
                    detector, train_data, val_data, params.bn_momentum, params.mixed_precision, params.jit_compile, epochs_done
                )
            qat_log = None
            if params.qat.enabled:
                if not float_done:
                    keep_float_phase(out, marker)
                    if pusher:
                        push_or_warn(pusher, TRAIN_STATE, params.epochs)
                tf.keras.utils.set_random_seed(params.seed)  # the same QAT after a kill as in one go
                qat_log = mm.quantization_aware_training(
                    detector,
                    train_data,
                    val_data,
                    epochs=params.qat.epochs,
                    learning_rate=params.qat.learning_rate,
                    batch_size=params.qat.batch_size,
                    alpha=params.cosine_decay_alpha,
                )
                mm.qat_checkpoint(detector).write(str(out / "qat_ckpt"))

            # Outputs.
            summary = {
                "architecture": params.architecture,
                "init": params.init,
                "start_point": start,  # scratch, mobilenet_v2_imagenet or a Model Maker COCO checkpoint
                "labels": labels,  # background first, as the model outputs them
                "classes": labels[1:],
                "l2_weight_decay": params.l2_weight_decay,
                "epochs": len(history.history),
                "train_images": train_info["size"],
                "val_images": len(val_data),
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
                "speed": mm.speed_settings(detector),
                "final": history.history[-1] if history.history else {},
                "qat": None if qat_log is None else {**params.qat.model_dump(exclude={"enabled"}), "history": qat_log},
            }
            final = {key: value for key, value in summary["final"].items() if key not in ("seconds", "train_images_per_s")}
            write_json(out / "train.json", {**summary, "final": final}, indent=True)  # measurements stay out
        if scratch is None:
            mark_complete(marker)
            if pusher:
                push_or_warn(pusher, TRAIN_STATE, params.epochs)  # a finished run: the next one may replace it
        return {**summary, "seconds": round(time.perf_counter() - started, 1)}
    finally:
        if scratch is not None:
            kept = discard_worker_outputs(scratch, plan.task)
            if kept is not None:
                print(f"train: {plan.task} kept its copy of {TRAINED} in {kept}")


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
