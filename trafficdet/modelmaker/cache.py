"""The cache stage's half of Model Maker: its TFRecord cache, written and read back.

``model_maker_folder`` builds the folder view Model Maker's cache writer insists on,
``write_coco_cache`` writes the same bytes on every core, and ``load_dataset`` /
``cache_record`` / ``label_names`` read the cache for the train, export and evaluate stages.
``quiet_tensorflow`` lives here because every TensorFlow stage imports this module anyway.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trafficdet.errors import PipelineError
from trafficdet.io import private_tmpdir, read_json, write_json
from trafficdet.paths import CACHE, IMAGE_STORE
from trafficdet.quiet import quiet_libraries


def quiet_tensorflow() -> None:
    """Silence TensorFlow's, MediaPipe's and their Python deps' known noise (trafficdet/quiet.py);
    call before importing them. Temp dirs go to ``data/.tmp/<pid>`` (``paths.TEMP``)."""
    quiet_libraries()
    private_tmpdir()


@contextlib.contextmanager
def model_maker_folder(
    labels_file: Path,
    store: Path = IMAGE_STORE,
    tmp_dir: Path | None = None,
    ignore_regions: bool = False,
) -> Iterator[Path]:
    """Model Maker's ``<dir>/images/*.jpg`` + ``<dir>/labels.json`` view of a split, for one block.

    The split stage writes only label files (a cached output DVC can push and pull);
    this builds the folder Model Maker insists on from symlinks into ``store`` in a
    throwaway directory (in ``tmp_dir``, default: the process's temp dir), removed afterwards.
    Crowd regions (``iscrowd: 1``) are left out of its ``labels.json`` (Model Maker's own cache
    writer has no crowd field and would train on them as objects) unless ``ignore_regions``:
    then they stay, for ``write_coco_cache`` to flag them (``image/object/is_crowd``) and the
    training input to ignore the anchors over them (``_train_preprocess``). They stay in the
    split's labels for COCOeval, which ignores detections matched to them.
    The folder itself is named after the side (``<temp>/train/``): Model Maker hashes its name
    into the cache's file prefix, which must not change from run to run.
    """
    coco = read_json(labels_file)
    parent = Path(tempfile.mkdtemp(dir=tmp_dir, prefix="model_maker."))
    folder = parent / labels_file.parent.name
    try:
        folder.mkdir()
        (folder / "images").mkdir()
        for image in coco["images"]:
            source = store / image["file_name"]
            if not source.is_file():
                raise PipelineError(f"{source}: missing (listed in {labels_file}); run the images stage (dvc repro images)")
            os.symlink(source.resolve(), folder / "images" / image["file_name"])
        if not ignore_regions:
            coco = {**coco, "annotations": [ann for ann in coco["annotations"] if not ann.get("iscrowd")]}
        write_json(folder / "labels.json", coco)
        yield folder
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def cache_record(side: str, root: Path = CACHE) -> dict[str, Any]:
    """The cache stage's ``cache.json`` for one side: size and label map, without TensorFlow."""
    return read_json(root / side / "cache.json")


def label_names(record: dict[str, Any]) -> list[str]:
    """Model Maker's label names in id order, ``background`` (id 0) first.

    Model Maker sizes the classifier by this list's length, so it must include
    background for ids 1..K to fit (``Dataset.label_names`` does the same).
    """
    return [name for _, name in sorted(record["label_map"].items(), key=lambda kv: int(kv[0]))]


def load_dataset(side: str, root: Path = CACHE):  # -> object_detector.Dataset
    """Open the cache stage's TFRecords for ``side`` (no images needed)."""
    import tensorflow as tf
    from mediapipe_model_maker.python.core.data.cache_files import TFRecordCacheFiles
    from mediapipe_model_maker.python.vision.object_detector.dataset import Dataset

    record = cache_record(side, root)
    files = TFRecordCacheFiles(record["cache_prefix_filename"], str(root / side), record["num_shards"])
    data = Dataset.from_cache(files)
    # TFRecords have no known length; saying it lets Keras show "n/N" steps from the first epoch on.
    data._dataset = data._dataset.apply(tf.data.experimental.assert_cardinality(data._size))
    return data


CACHE_BATCH = 32  # images per round trip from tf.data to the writing thread


def write_coco_cache(folder: Path, cache_dir: Path, parallel: bool = True) -> tuple[Any, int]:
    """Model Maker's TFRecord cache of a ``model_maker_folder``: (cache files, images written).

    The bytes of Model Maker's ``COCOCacheFilesWriter``, which decodes every JPEG in full, one
    after another, only to learn its size. Here the size comes from the JPEG header and each file
    is still decoded to its last byte at 1/8 scale (a corrupt file still fails, named; about 10%
    less CPU than a full decode), on every core in order, while this thread writes the same
    examples round-robin over the same shards (docs/speed.md, see BENCHMARKS.md).
    ``parallel=False`` calls Model Maker's writer itself (the baseline the tests compare with).
    """
    import gc

    from mediapipe_model_maker.python.vision.object_detector import dataset_util

    files = dataset_util.get_cache_files_coco(str(folder), str(cache_dir))  # prefix: Model Maker's hash of the folder
    label_map = dataset_util.get_label_map_coco(str(folder))
    if not parallel:
        dataset_util.COCOCacheFilesWriter(label_map=label_map).write_files(files, str(folder))
        return files, files.load_metadata()["size"]

    # The imports (TensorFlow, Model Maker) leave a heap that every full garbage collection this
    # writer's many small objects trigger would scan again; frozen, the collector skips it.
    gc.freeze()
    try:
        return _write_cache_in_parallel(folder, files, label_map)
    finally:
        gc.unfreeze()


def _write_cache_in_parallel(folder: Path, files: Any, label_map: dict[int, str]) -> tuple[Any, int]:
    """``write_coco_cache``'s own writer: decodes on every core, writes Model Maker's bytes in order."""
    import json

    import tensorflow as tf
    from mediapipe_model_maker.python.vision.object_detector import dataset_util
    from official.vision.data import tfrecord_lib

    with open(folder / "labels.json") as handle:  # the json module, as Model Maker: the same floats
        coco = json.load(handle)
    annotations: dict[Any, list[dict[str, Any]]] = {}
    for annotation in coco["annotations"]:
        annotations.setdefault(annotation["image_id"], []).append(annotation)
    paths = [str(folder.resolve() / "images" / image["file_name"]) for image in coco["images"]]

    def read_and_measure(path: Any) -> tuple[Any, Any, Any]:
        encoded = tf.io.read_file(path)
        checked = tf.io.decode_jpeg(encoded, channels=3, ratio=8)  # reads every byte; fails as a full decode would
        # Returned, so tf.data cannot prune the check (a control dependency alone is optimised away).
        return encoded, tf.image.extract_jpeg_shape(encoded)[:2], tf.shape(checked)[:2]

    def unreadable(first: int, err: Exception) -> tuple[dict[str, Any], Exception]:
        """The first image of the failed batch starting at ``first`` that fails alone, and its error."""
        batch = slice(first, first + CACHE_BATCH)
        for image, path in zip(coco["images"][batch], paths[batch], strict=True):
            try:
                read_and_measure(tf.constant(path))
            except tf.errors.InvalidArgumentError as alone:
                return image, alone
        return coco["images"][first], err

    # One decoder per core this process may use, and no autotuning: tf.data's autotune thread
    # took 0.6-1.1 s to wind down after the last image in about half the runs (see BENCHMARKS.md).
    options = tf.data.Options()
    options.autotune.enabled = False
    decoded = tf.data.Dataset.from_tensor_slices(paths or [""]).take(len(paths)).with_options(options)
    decoded = decoded.map(read_and_measure, num_parallel_calls=len(os.sched_getaffinity(0)), deterministic=True)
    decoded = decoded.batch(CACHE_BATCH).prefetch(2)  # batches: 1/32 of the Python round trips, 5% faster
    writers = files.get_writers()
    size = 0
    try:
        measured = decoded.as_numpy_iterator()
        for first in range(0, len(coco["images"]), CACHE_BATCH):
            try:
                encoded_chunk, shapes, _ = next(measured)  # in order: these images
            except tf.errors.InvalidArgumentError as err:
                image, err = unreadable(first, err)
                raise PipelineError(
                    f"{folder / 'images' / image['file_name']}: not a readable JPEG ({tf_message(err)}); "
                    "delete it and run the images stage again (dvc repro images)"
                ) from None
            chunk = coco["images"][first : first + CACHE_BATCH]
            for image, encoded, shape in zip(chunk, encoded_chunk, shapes, strict=True):
                height, width = int(shape[0]), int(shape[1])
                objects = [ann for ann in annotations.get(image["id"], []) if not ann.get("iscrowd")]
                boxes, _ = dataset_util._coco_annotations_to_lists(objects, height, width)
                if not boxes["xmin"]:
                    continue  # as Model Maker: an image with no box left is not cached
                features = tfrecord_lib.image_info_to_feature_dict(height, width, image["file_name"], image["id"], encoded, "jpg")
                regions, _ = dataset_util._coco_annotations_to_lists(
                    [ann for ann in annotations.get(image["id"], []) if ann.get("iscrowd")], height, width
                )
                if regions["xmin"]:  # ignore regions (model_maker_folder's ignore_regions) after the objects, flagged
                    boxes = {key: boxes[key] + regions[key] for key in boxes}
                    features.update(dataset_util._bbox_data_to_feature_dict(boxes))
                    features["image/object/is_crowd"] = tfrecord_lib.convert_to_feature(
                        [0] * (len(boxes["xmin"]) - len(regions["xmin"])) + [1] * len(regions["xmin"]), "int64_list"
                    )
                else:  # Model Maker's bytes
                    features.update(dataset_util._bbox_data_to_feature_dict(boxes))
                example = tf.train.Example(features=tf.train.Features(feature=features))
                writers[size % len(writers)].write(example.SerializeToString())
                size += 1
    finally:
        for writer in writers:
            writer.close()
    files.save_metadata({"size": size, "label_map": label_map})
    return files, size


def tf_message(err: Exception) -> str:
    """TensorFlow's error text without its ``{{function_node ...}}`` prefix, first line only."""
    return re.sub(r"\{\{[^}]*\}\}\s*", "", str(err)).strip().splitlines()[0][:200]
