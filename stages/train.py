"""train: fine-tune Model Maker's object detector on the cached TFRecords, resumably.

Reads data/cache/{train,val} and models/pretrained (or builds a scratch initialisation);
writes
    models/train/           float_ckpt.*, init/ (the
                            starting checkpoint, needed to rebuild the model) and train.json
    models/train_state/     persist: the last finished epoch (Keras BackupAndRestore) and the
                            logged history, so a killed run continues where it stopped
    reports/train/          dvclive: per-epoch train/val losses and learning rate
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

from trafficdet.errors import PipelineError, run_stage
from trafficdet.io import atomic_dir, read_json, write_json
from trafficdet.modelmaker import (
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


def validate(params: dict[str, Any], train_size: int) -> None:
    """Reject bad params before any TensorFlow work."""
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
    if params["distribution_strategy"] is False:  # YAML 1.1 reads an unquoted off as false
        params["distribution_strategy"] = "off"
    require_choice("train", params, "distribution_strategy", ["off", "one_device", "mirrored"])
    if (params.get("qat") or {}).get("enabled"):
        # Model Maker's quantization_aware_training() fails in this locked stack for every
        # architecture: tfmot raises "Layer conv2dbn_block_N (Conv2DBNBlock) is not supported"
        # (measured for mobilenet_multi_avg and mobilenet_v2). Fail before any training.
        raise PipelineError(
            "params.yaml train.qat.enabled: QAT does not work with the locked Model Maker 0.2.1.4 / tf-models 2.15 / "
            "tfmot stack (tfmot cannot quantize tf-models' Conv2DBNBlock); use export.quantization: int8 "
            "(post-training) instead"
        )


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

        def _learning_rate(self) -> float:
            optimizer = self.model.optimizer
            rate = optimizer.learning_rate
            return float(rate(optimizer.iterations) if callable(rate) else rate)

        def on_test_begin(self, logs: dict | None = None) -> None:
            self.validation_started = time.perf_counter()  # fit() validates at each epoch's end

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = self.validation_started = time.perf_counter()
            if self.live is None:
                self.history = self.history[:epoch]
                shutil.rmtree(live_dir, ignore_errors=True)
                self.live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False)
                for record in self.history:
                    self._log(record)
                if epoch:
                    print(f"train: resuming after epoch {epoch} (from {STATE_DIR})")

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            now = time.perf_counter()
            training = (self.validation_started if self.validation_started > self.started else now) - self.started
            record = {
                "epoch": epoch + 1,
                "learning_rate": self._learning_rate(),
                "seconds": now - self.started,
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


def create_model_with_bn_momentum(detector: Any, momentum: float) -> None:
    """``detector._create_model()`` with another BatchNorm momentum in tf-models' config.

    Setting ``layer.momentum`` after the model is built has no effect on these
    (synchronized) BatchNorm layers: measured, a momentum-0 update moved the moving
    variance by 1%, as 0.99 does. The config's ``norm_momentum`` is read at build time.
    """
    from mediapipe_model_maker.python.vision.object_detector import model as model_lib

    class Model(model_lib.ObjectDetectorModel):
        def _get_model_config(self, *args: Any, **kwargs: Any) -> Any:
            config = super()._get_model_config(*args, **kwargs)
            config.norm_activation.norm_momentum = momentum
            return config

    detector._model = Model(
        model_spec=detector._model_spec, model_options=detector._model_options, num_classes=detector._num_classes
    )


def create_and_train(detector: Any, train_data: Any, val_data: Any, bn_momentum: float | None) -> None:
    """Model Maker's ``_create_and_train_model``, with an optional BatchNorm momentum.

    From scratch, the default momentum (0.99) leaves the moving statistics far behind
    the quickly changing weights: measured on 239 synthetic images after 6 epochs, the
    same batches scored 0.83 loss with batch statistics and 1.85 with the moving ones,
    which is the train/validation gap. A lower momentum (0.9) lets them keep up.
    """
    from mediapipe_model_maker.python.core.utils import model_util

    # Model Maker 0.2.1.4 builds train.distribution_strategy but never enters it: do it here.
    strategy = detector._hparams.get_strategy()
    with strategy.scope() if strategy else contextlib.nullcontext():
        detector._optimizer = detector._create_optimizer(
            model_util.get_steps_per_epoch(steps_per_epoch=None, batch_size=detector._hparams.batch_size, train_data=train_data)
        )
        with contextlib.redirect_stdout(io.StringIO()):  # Model Maker prints a 100-line model summary
            if bn_momentum is None:
                detector._create_model()
            else:
                create_model_with_bn_momentum(detector, float(bn_momentum))
        detector._train_model(train_data, val_data, preprocessor=detector._preprocessor)
    detector._save_float_ckpt()


def train(params: dict[str, Any]) -> dict[str, Any]:
    """Train (resuming if a matching state exists) and write models/train atomically."""
    train_info = cache_record("train")
    validate(params, train_info["size"])
    quiet_tensorflow()
    import tensorflow as tf

    tf.keras.utils.set_random_seed(int(params["seed"]))
    tf.config.experimental.enable_op_determinism()  # identical weights for a fixed seed on CPU

    state_id = fingerprint(params)
    marker = STATE_DIR / "state.json"
    saved = read_json(marker) if marker.exists() else {}
    if saved.get("fingerprint") != state_id or saved.get("complete"):
        shutil.rmtree(STATE_DIR, ignore_errors=True)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"fingerprint": state_id, "complete": False}, indent=True)

    train_data, val_data = load_dataset("train"), load_dataset("val")
    labels = label_names(train_info)
    hparams = {
        "learning_rate": float(params["learning_rate"]),
        "batch_size": int(params["batch_size"]),
        "epochs": int(params["epochs"]),
        "cosine_decay_epochs": params.get("cosine_decay_epochs"),
        "cosine_decay_alpha": float(params["cosine_decay_alpha"]),
        "shuffle": bool(params["shuffle"]),
        "distribution_strategy": params["distribution_strategy"],
        "num_gpus": int(params["num_gpus"]),
    }
    with atomic_dir(OUT_DIR) as out:
        init_checkpoint(params, len(labels), out / "init")
        detector = build_detector(params["architecture"], out / "init", labels, hparams, float(params["l2_weight_decay"]), out)
        history = make_history_callback(LIVE_DIR, STATE_DIR / "history.json", train_info["size"])
        backup = tf.keras.callbacks.BackupAndRestore(str(STATE_DIR / "backup"))
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
            "seconds": round(time.perf_counter() - started, 1),
            "final": history.history[-1] if history.history else {},
        }
        write_json(out / "train.json", summary, indent=True)
    write_json(marker, {"fingerprint": state_id, "complete": True}, indent=True)
    shutil.rmtree(STATE_DIR / "backup", ignore_errors=True)
    return summary


def main() -> None:
    summary = train(load_section("train"))
    final = summary["final"]
    print(
        f"train: {summary['epochs']} epochs in {summary['seconds']} s; "
        f"loss {final.get('total_loss', float('nan')):.3f}, val loss {final.get('val_total_loss', float('nan')):.3f}"
    )


if __name__ == "__main__":
    run_stage(main)
