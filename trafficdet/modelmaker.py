"""Model Maker glue shared by the train, export and evaluate stages.

Builds an ``ObjectDetector`` from our params and the cached TFRecords without Model
Maker's own downloads: the checkpoint folder is handed over as an absolute path (its
``DownloadedFiles.get_path`` joins it onto ``$TMPDIR/model_maker`` and an absolute path
wins), so the user's real temp dir is never read or written for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trafficdet.architectures import ARCHITECTURES
from trafficdet.errors import PipelineError
from trafficdet.io import read_json

CACHE_DIR = Path("data/cache")
IMAGE_STORE = Path("data/images")
PRIVATE_TMP = Path("data/.tmp")  # Model Maker's HParams makes temp dirs at import time


def quiet_tensorflow() -> None:
    """Silence TF's C++ start-up chatter and third-party deprecation warnings; call before importing TF."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    PRIVATE_TMP.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(PRIVATE_TMP.resolve())
    tempfile.tempdir = None  # re-read TMPDIR
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)


@contextlib.contextmanager
def model_maker_folder(labels_file: Path, store: Path = IMAGE_STORE, scratch: Path = PRIVATE_TMP) -> Iterator[Path]:
    """Model Maker's ``<dir>/images/*.jpg`` + ``<dir>/labels.json`` view of a split, for one block.

    The split stage writes only label files (a cached output DVC can push and pull);
    this builds the folder Model Maker insists on from symlinks into ``store`` in a
    throwaway directory, and removes it afterwards.
    """
    coco = read_json(labels_file)
    scratch.mkdir(parents=True, exist_ok=True)
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


def cache_record(side: str, cache_dir: Path = CACHE_DIR) -> dict[str, Any]:
    """The cache stage's ``cache.json`` for one side: size and label map, without TensorFlow."""
    return read_json(cache_dir / side / "cache.json")


def load_dataset(side: str, cache_dir: Path = CACHE_DIR):  # -> object_detector.Dataset
    """Open the cache stage's TFRecords for ``side`` (no images needed)."""
    from mediapipe_model_maker.python.core.data.cache_files import TFRecordCacheFiles
    from mediapipe_model_maker.python.vision.object_detector.dataset import Dataset

    record = cache_record(side, cache_dir)
    files = TFRecordCacheFiles(record["cache_prefix_filename"], str(cache_dir / side), record["num_shards"])
    return Dataset.from_cache(files)


def model_spec(architecture: str, checkpoint_dir: Path):
    """Model Maker's spec for ``architecture`` with its checkpoint folder at ``checkpoint_dir``."""
    from mediapipe_model_maker.python.core.utils.file_util import DownloadedFiles
    from mediapipe_model_maker.python.vision.object_detector import model_spec as ms

    arch = ARCHITECTURES[architecture]
    spec = ms.SupportedModels[arch.enum_name].value()
    files = DownloadedFiles(str(checkpoint_dir.resolve()), arch.checkpoint_url, is_folder=True)
    return dataclasses.replace(spec, downloaded_files=files)


def write_scratch_checkpoint(spec: Any, num_classes: int, l2_weight_decay: float, out_dir: Path) -> None:
    """A randomly initialised checkpoint in Model Maker's layout, for offline training.

    Model Maker always restores a checkpoint when it builds a model; this one holds the
    freshly initialised (seeded) backbone, decoder and head instead of COCO weights.
    """
    import tensorflow as tf
    from mediapipe_model_maker.python.vision.object_detector import model as model_lib
    from mediapipe_model_maker.python.vision.object_detector import model_options

    builder = model_lib.ObjectDetectorModel.__new__(model_lib.ObjectDetectorModel)
    builder._model_spec = spec  # only what _build_model reads
    builder._model_options = model_options.ObjectDetectorModelOptions(l2_weight_decay=l2_weight_decay)
    builder._num_classes = num_classes
    network = builder._build_model()
    network(tf.zeros([1, *spec.input_image_shape]), training=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    tf.train.Checkpoint(backbone=network.backbone, decoder=network.decoder, head=network.head).write(
        str(out_dir / spec.checkpoint_name)
    )


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


def require_architecture(section: str, name: str) -> str:
    if name not in ARCHITECTURES:
        raise PipelineError(f"params.yaml {section}.architecture: {name!r} is not one of {', '.join(ARCHITECTURES)}")
    return name


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
