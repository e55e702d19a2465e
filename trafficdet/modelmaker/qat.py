"""Quantization-aware training: the QAT conversion, its training phase and its checkpoint."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from trafficdet.modelmaker.build import build_optimizer, restore_detector


def convert_to_qat(detector: Any) -> None:
    """Model Maker's ``convert_to_qat``: backbone, decoder and head quantized by tfmot (fake int8).

    It rebuilds the network from ``_get_model_config()``, so the BatchNorm momentum
    ``create_model`` put there (``train.bn_momentum``) holds in the QAT model too.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        detector._model.convert_to_qat()
    detector._is_qat = True


def quantization_aware_training(
    detector: Any,
    train_data: Any,
    val_data: Any,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    alpha: float,
) -> list[dict[str, float]]:
    """Model Maker's ``quantization_aware_training`` in the strategy's scope; each epoch's losses.

    Model Maker's own decays the rate by 0.96 every 8 steps whatever the data size (next to
    nothing after one epoch, see docs/model.md); this one decays it over the QAT epochs with a
    cosine to ``alpha`` of the start, like the float phase, from ``learning_rate x batch / 256``.
    """
    import tensorflow as tf
    from mediapipe_model_maker.python.core.utils import model_util

    strategy = detector._hparams.get_strategy()
    steps = model_util.get_steps_per_epoch(steps_per_epoch=None, batch_size=batch_size, train_data=train_data)
    with strategy.scope() if strategy else contextlib.nullcontext():
        convert_to_qat(detector)
        schedule = tf.keras.optimizers.schedules.CosineDecay(learning_rate * batch_size / 256, steps * epochs, alpha)
        optimizer = tf.keras.optimizers.experimental.SGD(learning_rate=schedule, momentum=0.9)
        build_optimizer(optimizer, detector._model)
        detector._model.compile(optimizer=optimizer)
        # The float phase's BackupAndRestore deletes this Keras attribute when it ends, and a
        # second fit() on the same model reads it: restore the value Model.__init__ sets.
        detector._model._training_state = None
        train = train_data.gen_tf_dataset(
            batch_size=batch_size, is_training=True, shuffle=detector._shuffle, preprocess=detector._preprocessor
        ).take(steps)
        val = val_data.gen_tf_dataset(batch_size=batch_size, is_training=False, preprocess=detector._preprocessor)
        logged = detector._model.fit(x=train, epochs=epochs, validation_data=val).history
    return [
        {
            "epoch": epoch + 1,
            "learning_rate": float(schedule((epoch + 1) * steps)),
            **{k: float(v[epoch]) for k, v in logged.items()},
        }
        for epoch in range(epochs)
    ]


def qat_checkpoint(detector: Any) -> Any:
    """A ``tf.train.Checkpoint`` of the QAT network: weights and the fake-quant ranges to export."""
    import tensorflow as tf

    return tf.train.Checkpoint(model=detector._model._model)


def restore_qat_detector(train_dir: Path, export_dir: Path):
    """The trained ``ObjectDetector`` converted to QAT, with the train stage's QAT weights."""
    detector = restore_detector(train_dir, export_dir)
    convert_to_qat(detector)
    status = qat_checkpoint(detector).read(str(train_dir / "qat_ckpt"))
    status.expect_partial().assert_existing_objects_matched()
    return detector
