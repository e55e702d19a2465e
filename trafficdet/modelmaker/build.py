"""Model Maker's detector built from our params, offline, and restored from the train stage.

The checkpoint folder is handed to Model Maker as an absolute path (``DownloadedFiles.get_path``
joins it onto ``$TMPDIR/model_maker`` and an absolute path wins), so nothing is downloaded and
the user's real temp dir is never read or written for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path
from typing import Any

from trafficdet.architectures import ARCHITECTURES
from trafficdet.io import read_json


def model_spec(architecture: str, checkpoint_dir: Path):
    """Model Maker's spec for ``architecture`` with its checkpoint folder at ``checkpoint_dir``."""
    from mediapipe_model_maker.python.core.utils.file_util import DownloadedFiles
    from mediapipe_model_maker.python.vision.object_detector import model_spec as ms

    arch = ARCHITECTURES[architecture]
    spec = ms.SupportedModels[arch.enum_name].value()
    files = DownloadedFiles(str(checkpoint_dir.resolve()), arch.checkpoint_url, is_folder=True)
    return dataclasses.replace(spec, downloaded_files=files)


def build_network(spec: Any, num_classes: int, l2_weight_decay: float) -> Any:
    """Model Maker's RetinaNet for ``spec``, freshly initialised (by the global seed) and built."""
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


def retinanet(detector: Any) -> Any:
    """tf-models' RetinaNetModel in an ``ObjectDetector`` (the QAT one after ``convert_to_qat``)."""
    return detector._model._model


def detector_spec(detector: Any) -> Any:
    """The ``ModelSpec`` an ``ObjectDetector`` was built with (input shape, normalisation)."""
    return detector._model_spec


def preprocessor(detector: Any) -> Any:
    """The preprocessor Model Maker trains and evaluates with (letterbox to the model's size)."""
    return detector._preprocessor


def build_optimizer(optimizer: Any, model: Any) -> None:
    """Create the optimizer's slot variables before ``fit``.

    Keras creates them on the first train step, inside its ``tf.function``, and a function that
    creates variables is traced twice: building them first saves a whole trace of the train step
    (timed in BENCHMARKS.md, "make test from a fresh clone"); the checkpoint bytes are the same.
    """
    optimizer.build(model.trainable_variables)
