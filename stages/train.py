"""train: fine-tune Model Maker's object detector on the cached TFRecords, resumably.

Reads data/cache/{train,val} and models/pretrained (or builds a scratch initialisation);
writes
    models/train/           float_ckpt.*, init/ (the starting checkpoint, needed to rebuild
                            the model) and train.json
    models/train_state/     persist: the last finished epoch (Keras BackupAndRestore) and the
                            logged history, so a killed run continues where it stopped
    reports/train/          dvclive: per-epoch train/val losses and learning rate
    reports/timing/train/   dvclive: per-epoch seconds and training images/s (measurements)

With train.distribution_strategy: multi_worker_mirrored only the chief writes these; other
workers train in step with it and discard what they write (trafficdet/distribute.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from trafficdet import modelmaker as mm
from trafficdet.distribute import (
    Distribution,
    auto_shard_options,
    check_batches,
    check_same_start,
    make_strategy,
    plan_distribution,
    restored_epochs,
    strategy_devices,
)
from trafficdet.errors import PipelineError, run_stage
from trafficdet.history import make_history_callback
from trafficdet.io import atomic_dir, read_json, write_json
from trafficdet.params import TrainParams, load
from trafficdet.paths import PRETRAINED, TRAIN_LIVE, TRAIN_STATE, TRAIN_TIMING, TRAINED


def validate(params: TrainParams, train_size: int, val_size: int) -> Distribution:
    """Reject what params.yaml cannot check alone, before any TensorFlow work; return the plan."""
    if params.batch_size > train_size:
        raise PipelineError(
            f"params.yaml train.batch_size: {params.batch_size} is larger than the training set ({train_size} images)"
        )
    if params.qat.enabled:
        # Model Maker's quantization_aware_training() fails in this locked stack for every
        # architecture: tfmot raises "Layer conv2dbn_block_N (Conv2DBNBlock) is not supported".
        raise PipelineError(
            "params.yaml train.qat.enabled: QAT does not work with the locked Model Maker 0.2.1.4 / tf-models 2.15 / "
            "tfmot stack (tfmot cannot quantize tf-models' Conv2DBNBlock); use export.quantization: int8 "
            "(post-training) instead"
        )
    plan = plan_distribution(params)
    check_batches(params, plan, val_size)
    return plan


def leakage_warning(params: TrainParams, val_record: dict[str, Any]) -> str | None:
    """One line when a COCO-trained start point is validated on COCO train2017 images it was trained on.

    Model Maker's checkpoints (``train.init: pretrained``) were trained on COCO train2017; the
    cache stage records where the validation images come from.
    """
    seen = val_record.get("origins", {}).get("train2017", 0)
    if params.init != "pretrained" or not seen:
        return None
    return (
        f"train: warning: {seen} of {val_record['size']} validation images are from COCO train2017, which the pretrained "
        f"{params.architecture} checkpoint was trained on: validation loss and AP are optimistic and not comparable "
        "with published COCO figures (split.method: coco validates on val2017 only)"
    )


def init_checkpoint(params: TrainParams, num_classes: int, out: Path) -> None:
    """Put the starting checkpoint in ``out``: the downloaded one, or a seeded scratch one."""
    if params.init == "pretrained":
        manifest = read_json(PRETRAINED / "manifest.json")
        if manifest.get("pretrained") != params.architecture:
            raise PipelineError(
                f"train.init is pretrained for {params.architecture!r} but the download stage fetched "
                f"{manifest.get('pretrained')!r}: set download.pretrained: {params.architecture}, or train.init: scratch"
            )
        shutil.copytree(PRETRAINED / params.architecture, out)
    else:
        spec = mm.model_spec(params.architecture, out)
        mm.write_scratch_checkpoint(spec, num_classes, params.l2_weight_decay, out)


def fingerprint(params: TrainParams) -> str:
    """What a saved training state belongs to: the params and the exact cached data."""
    cached = [mm.cache_record(side) for side in ("train", "val")]
    return hashlib.sha256(json.dumps([params.model_dump(), cached], sort_keys=True).encode()).hexdigest()


def prepare_state(state_id: str, scratch: Path | None, state_dir: Path) -> Path:
    """Keep a matching unfinished run's state (to resume) or start a fresh one; return the marker file.

    On a non-chief worker, a copy of the chief's backup goes into its scratch folder: Keras
    restores every worker from ``<backup>/chief``, and models/train_state stays the chief's.
    """
    marker = TRAIN_STATE / "state.json"
    saved = read_json(marker) if marker.exists() else {}
    resume = saved.get("fingerprint") == state_id and not saved.get("complete")
    if scratch is None:
        if not resume:
            shutil.rmtree(TRAIN_STATE, ignore_errors=True)
        TRAIN_STATE.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"fingerprint": state_id, "complete": False}, indent=True)
    elif resume and (TRAIN_STATE / "backup/chief").exists():
        shutil.copytree(TRAIN_STATE / "backup/chief", state_dir / "backup/chief")
        if (TRAIN_STATE / "history.json").exists():
            shutil.copy2(TRAIN_STATE / "history.json", state_dir / "history.json")
    return marker


def train(params: TrainParams) -> dict[str, Any]:
    """Train (resuming if a matching state exists) and write models/train atomically (on the chief only)."""
    # Config: everything checkable is checked before TensorFlow starts.
    train_info, val_info = mm.cache_record("train"), mm.cache_record("val")
    plan = validate(params, train_info["size"], val_info["size"])
    warning = leakage_warning(params, val_info)
    if warning and plan.chief:
        print(warning, flush=True)
    mm.quiet_tensorflow()
    import tensorflow as tf

    strategy = make_strategy(plan, params)  # first: nothing may touch TensorFlow's runtime before it
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
        state_id = fingerprint(params)
        marker = prepare_state(state_id, scratch, state_dir)
        if plan.workers > 1:
            check_same_start(strategy, restored_epochs(state_dir / "backup"))

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
            init_checkpoint(params, len(labels), out / "init")
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
                live_dir, timing_dir, state_dir / "history.json", train_info["size"], params.epochs, params.batch_size
            )
            mm.set_callbacks(detector, [history, tf.keras.callbacks.BackupAndRestore(str(state_dir / "backup"))])

            # Loop.
            started = time.perf_counter()
            mm.create_and_train(  # writes out/float_ckpt
                detector, train_data, val_data, params.bn_momentum, params.mixed_precision, params.jit_compile
            )

            # Outputs.
            summary = {
                "architecture": params.architecture,
                "init": params.init,
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
            }
            final = {key: value for key, value in summary["final"].items() if key not in ("seconds", "train_images_per_s")}
            write_json(out / "train.json", {**summary, "final": final}, indent=True)  # measurements stay out
        if scratch is None:  # finished: what was kept for resuming goes
            write_json(marker, {"fingerprint": state_id, "complete": True}, indent=True)
            shutil.rmtree(TRAIN_STATE / "backup", ignore_errors=True)
            (TRAIN_STATE / "history.json").unlink(missing_ok=True)
        return {**summary, "seconds": round(time.perf_counter() - started, 1)}
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    summary = train(load(TrainParams))
    final, where = summary["final"], summary["distribution"]
    scale = f" on {where['num_replicas_in_sync']} replicas ({where['strategy']})" if where["num_replicas_in_sync"] > 1 else ""
    print(
        f"train: {summary['epochs']} epochs of {final.get('steps', '?')} steps in {summary['seconds']} s{scale}; "
        f"loss {final.get('total_loss', float('nan')):.3f}, val loss {final.get('val_total_loss', float('nan')):.3f}"
    )
    if not where["chief"]:
        print(f"train: {where['task']} is not the chief: its copy of the outputs was discarded (the chief writes {TRAINED})")


if __name__ == "__main__":
    run_stage(main)
