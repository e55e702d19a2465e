"""Every use of Model Maker 0.2.1.4's private API, in one place: an upgrade re-checks this file.

The train, export and evaluate stages build an ``ObjectDetector`` from our params and the
cached TFRecords without Model Maker's own downloads: the checkpoint folder is handed over
as an absolute path (``DownloadedFiles.get_path`` joins it onto ``$TMPDIR/model_maker`` and
an absolute path wins), so the user's real temp dir is never read or written for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trafficdet.architectures import ARCHITECTURES
from trafficdet.errors import PipelineError
from trafficdet.io import private_tmpdir, read_json
from trafficdet.paths import CACHE, IMAGE_STORE


def quiet_tensorflow() -> None:
    """Silence TensorFlow's known start-up noise; call before importing it.

    On a CPU-only machine TF 2.15 logs cuDNN/cuFFT/cuBLAS "registration" errors and a
    missing-GPU warning at import (C++ log level 2 hides them), and its Python deps emit
    deprecation warnings nobody here can act on. Temp dirs go to ``data/.tmp/<pid>``.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    private_tmpdir()
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)


@contextlib.contextmanager
def model_maker_folder(labels_file: Path, store: Path = IMAGE_STORE, scratch: Path | None = None) -> Iterator[Path]:
    """Model Maker's ``<dir>/images/*.jpg`` + ``<dir>/labels.json`` view of a split, for one block.

    The split stage writes only label files (a cached output DVC can push and pull);
    this builds the folder Model Maker insists on from symlinks into ``store`` in a
    throwaway directory (in ``scratch``, default: the process's temp dir), and removes it afterwards.
    """
    coco = read_json(labels_file)
    folder = Path(tempfile.mkdtemp(dir=scratch, prefix=f"{labels_file.parent.name}."))
    try:
        (folder / "images").mkdir()
        for image in coco["images"]:
            source = store / image["file_name"]
            if not source.is_file():
                raise PipelineError(f"{source}: missing (listed in {labels_file}); run the images stage (dvc repro images)")
            os.symlink(source.resolve(), folder / "images" / image["file_name"])
        shutil.copyfile(labels_file, folder / "labels.json")
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def cache_record(side: str, root: Path = CACHE) -> dict[str, Any]:
    """The cache stage's ``cache.json`` for one side: size and label map, without TensorFlow."""
    return read_json(root / side / "cache.json")


def load_dataset(side: str, root: Path = CACHE):  # -> object_detector.Dataset
    """Open the cache stage's TFRecords for ``side`` (no images needed)."""
    from mediapipe_model_maker.python.core.data.cache_files import TFRecordCacheFiles
    from mediapipe_model_maker.python.vision.object_detector.dataset import Dataset

    record = cache_record(side, root)
    files = TFRecordCacheFiles(record["cache_prefix_filename"], str(root / side), record["num_shards"])
    return Dataset.from_cache(files)


def model_spec(architecture: str, checkpoint_dir: Path):
    """Model Maker's spec for ``architecture`` with its checkpoint folder at ``checkpoint_dir``."""
    from mediapipe_model_maker.python.core.utils.file_util import DownloadedFiles
    from mediapipe_model_maker.python.vision.object_detector import model_spec as ms

    arch = ARCHITECTURES[architecture]
    spec = ms.SupportedModels[arch.enum_name].value()
    files = DownloadedFiles(str(checkpoint_dir.resolve()), arch.checkpoint_url, is_folder=True)
    return dataclasses.replace(spec, downloaded_files=files)


def build_network(spec: Any, num_classes: int, l2_weight_decay: float) -> Any:
    """Model Maker's RetinaNet for ``spec``, freshly initialised (seeded by the global seed) and built."""
    import tensorflow as tf
    from mediapipe_model_maker.python.vision.object_detector import model as model_lib
    from mediapipe_model_maker.python.vision.object_detector import model_options

    builder = model_lib.ObjectDetectorModel.__new__(model_lib.ObjectDetectorModel)
    builder._model_spec = spec  # only what _build_model reads
    builder._model_options = model_options.ObjectDetectorModelOptions(l2_weight_decay=l2_weight_decay)
    builder._num_classes = num_classes
    network = builder._build_model()
    network(tf.zeros([1, *spec.input_image_shape]), training=True)
    return network


def write_init_checkpoint(network: Any, spec: Any, out_dir: Path) -> None:
    """``network`` as the starting checkpoint in Model Maker's layout, for offline training.

    Model Maker always restores a checkpoint when it builds a model (``load_checkpoint``:
    backbone, decoder and head, all but the classifier's last layer); written from a
    ``build_network`` network this is a seeded scratch start, or an ImageNet one once its
    backbone holds Keras Applications' weights.
    """
    import tensorflow as tf

    out_dir.mkdir(parents=True, exist_ok=True)
    tf.train.Checkpoint(backbone=network.backbone, decoder=network.decoder, head=network.head).write(
        str(out_dir / spec.checkpoint_name)
    )


def write_scratch_checkpoint(spec: Any, num_classes: int, l2_weight_decay: float, out_dir: Path) -> None:
    """A randomly initialised (seeded) checkpoint in Model Maker's layout."""
    write_init_checkpoint(build_network(spec, num_classes, l2_weight_decay), spec, out_dir)


def build_detector(
    architecture: str,
    checkpoint_dir: Path,
    label_names: list[str],
    hparams: dict[str, Any],
    l2_weight_decay: float,
    export_dir: Path,
):
    """An untrained ``ObjectDetector`` whose float checkpoint lives in ``export_dir``."""
    from mediapipe_model_maker.python.vision.object_detector import hyperparameters, model_options, object_detector

    return object_detector.ObjectDetector(
        model_spec=model_spec(architecture, checkpoint_dir),
        label_names=label_names,
        hparams=hyperparameters.HParams(export_dir=str(export_dir), **hparams),
        model_options=model_options.ObjectDetectorModelOptions(l2_weight_decay=l2_weight_decay),
    )


def label_names(record: dict[str, Any]) -> list[str]:
    """Model Maker's label names in id order, ``background`` (id 0) first.

    Model Maker sizes the classifier by this list's length, so it must include
    background for ids 1..K to fit (``Dataset.label_names`` does the same).
    """
    return [name for _, name in sorted(record["label_map"].items(), key=lambda kv: int(kv[0]))]


def restore_detector(train_dir: Path, export_dir: Path):
    """Rebuild the trained ``ObjectDetector`` from the train stage's float checkpoint."""
    summary = read_json(train_dir / "train.json")
    detector = build_detector(
        summary["architecture"], train_dir / "init", summary["labels"], {}, summary["l2_weight_decay"], train_dir
    )
    with contextlib.redirect_stdout(io.StringIO()):  # Model Maker prints a 100-line model summary
        detector.restore_float_ckpt()  # reads train_dir/float_ckpt
    detector._hparams.export_dir = str(export_dir)  # export writes here, not into the train output
    return detector


def keras_model(detector: Any) -> Any:
    """The Keras model inside an ``ObjectDetector``."""
    return detector._model


def preprocessor(detector: Any) -> Any:
    """The preprocessor Model Maker trains and evaluates with (letterbox to the model's size)."""
    return detector._preprocessor


def set_callbacks(detector: Any, callbacks: list[Any]) -> None:
    """Model Maker's ``fit()`` takes its callbacks from this attribute."""
    detector._callbacks = callbacks


def set_strategy(detector: Any, strategy: Any) -> None:
    """Use our tf.distribute strategy (made before TensorFlow's runtime starts) instead of building one."""
    detector._hparams._strategy = strategy


def set_dataset_options(data: Any, options: Any) -> None:
    """Apply ``tf.data.Options`` (e.g. the auto-shard policy) to a Model Maker dataset."""
    data._dataset = data._dataset.with_options(options)


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


def create_model(detector: Any, bn_momentum: float | None, replicas: int = 1) -> None:
    """``detector._create_model()``, with another BatchNorm momentum and the loss divided per replica.

    Setting ``layer.momentum`` after the model is built has no effect on these
    (synchronized) BatchNorm layers: measured, a momentum-0 update moved the moving
    variance by 1%, as 0.99 does. The config's ``norm_momentum`` is read at build time.

    With ``replicas`` > 1 each replica's loss is divided by the replica count before the
    gradient: Model Maker's ``train_step`` does not, and Keras sums the replicas' gradients,
    so N replicas would otherwise take N times the step of one device on the same global batch.
    Measured, one step of 32 images from the same weights: 2 CPU replicas moved the backbone
    and decoder 1.98x as far as one device without the division, 0.99x with it (cosine 0.987).
    """
    if bn_momentum is None and replicas == 1:
        with contextlib.redirect_stdout(io.StringIO()):  # Model Maker prints a 100-line model summary
            detector._create_model()
        return

    import tensorflow as tf
    from mediapipe_model_maker.python.vision.object_detector import model as model_lib

    class Model(model_lib.ObjectDetectorModel):
        def _get_model_config(self, *args: Any, **kwargs: Any) -> Any:
            config = super()._get_model_config(*args, **kwargs)
            if bn_momentum is not None:
                config.norm_activation.norm_momentum = bn_momentum
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

    with contextlib.redirect_stdout(io.StringIO()):
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
        create_model(detector, bn_momentum, replicas)
        detector._train_model(train_data, val_data, preprocessor=detector._preprocessor)
    detector._save_float_ckpt()  # on every worker: saving reduces BatchNorm's moving statistics over all replicas


def restore_trained_float(detector: Any, checkpoint: Path, bn_momentum: float | None) -> None:
    """Rebuild the float model (as ``create_and_train`` built it) from a finished float phase's checkpoint."""
    strategy = detector._hparams.get_strategy()
    replicas = strategy.num_replicas_in_sync if strategy else 1
    with strategy.scope() if strategy else contextlib.nullcontext():
        create_model(detector, bn_momentum, replicas)
        detector._model.load_checkpoint(str(checkpoint), include_last_layer=True)


def convert_to_qat(detector: Any) -> None:
    """Model Maker's ``convert_to_qat``: tfmot-quantized backbone, decoder and head (fake-quant int8).

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
    """Model Maker's ``quantization_aware_training``, in the strategy's scope; return each epoch's losses.

    Model Maker's own decays the rate by 0.96 every 8 steps whatever the data size (on 14k
    images that is 0.0008 of the start after one epoch); this one decays it over the QAT
    epochs with a cosine to ``alpha`` of the start, like the float phase. Its base rate is
    scaled by ``batch_size / 256`` as Model Maker scales both.
    """
    import tensorflow as tf
    from mediapipe_model_maker.python.core.utils import model_util

    strategy = detector._hparams.get_strategy()
    steps = model_util.get_steps_per_epoch(steps_per_epoch=None, batch_size=batch_size, train_data=train_data)
    with strategy.scope() if strategy else contextlib.nullcontext():
        convert_to_qat(detector)
        schedule = tf.keras.optimizers.schedules.CosineDecay(learning_rate * batch_size / 256, steps * epochs, alpha)
        detector._model.compile(optimizer=tf.keras.optimizers.experimental.SGD(learning_rate=schedule, momentum=0.9))
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
    """A ``tf.train.Checkpoint`` of the QAT network: weights and the fake-quant ranges export needs."""
    import tensorflow as tf

    return tf.train.Checkpoint(model=detector._model._model)


def restore_qat_detector(train_dir: Path, export_dir: Path):
    """The trained ``ObjectDetector`` converted to QAT with the train stage's QAT weights, ready to export int8."""
    detector = restore_detector(train_dir, export_dir)
    convert_to_qat(detector)
    status = qat_checkpoint(detector).read(str(train_dir / "qat_ckpt"))
    status.expect_partial().assert_existing_objects_matched()
    return detector
