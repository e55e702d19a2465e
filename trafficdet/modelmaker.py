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
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trafficdet.architectures import ARCHITECTURES
from trafficdet.errors import PipelineError
from trafficdet.io import private_tmpdir, read_json, write_json
from trafficdet.paths import CACHE, IMAGE_STORE
from trafficdet.quiet import quiet_libraries


def quiet_tensorflow() -> None:
    """Silence TensorFlow's, MediaPipe's and their Python deps' known noise (trafficdet/quiet.py);
    call before importing them. Temp dirs go to ``data/.tmp/<pid>``."""
    quiet_libraries()
    private_tmpdir()


@contextlib.contextmanager
def model_maker_folder(
    labels_file: Path, store: Path = IMAGE_STORE, scratch: Path | None = None, ignore_regions: bool = False
) -> Iterator[Path]:
    """Model Maker's ``<dir>/images/*.jpg`` + ``<dir>/labels.json`` view of a split, for one block.

    The split stage writes only label files (a cached output DVC can push and pull);
    this builds the folder Model Maker insists on from symlinks into ``store`` in a
    throwaway directory (in ``scratch``, default: the process's temp dir), and removes it afterwards.
    Crowd regions (``iscrowd: 1``) are left out of its ``labels.json`` (Model Maker's own cache
    writer has no crowd field and would train on them as objects) unless ``ignore_regions``:
    then they stay, for ``write_coco_cache`` to flag them (``image/object/is_crowd``) and the
    training input to ignore the anchors over them (``_train_preprocess``). They stay in the
    split's labels for COCOeval, which ignores detections matched to them.
    The folder itself is named after the side (``<temp>/train/``): Model Maker hashes its name
    into the cache's file prefix, which must not change from run to run.
    """
    coco = read_json(labels_file)
    parent = Path(tempfile.mkdtemp(dir=scratch, prefix="model_maker."))
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


def retinanet(detector: Any) -> Any:
    """tf-models' RetinaNetModel inside an ``ObjectDetector`` (its QAT rebuild after ``convert_to_qat``)."""
    return detector._model._model


def detector_spec(detector: Any) -> Any:
    """The ``ModelSpec`` an ``ObjectDetector`` was built with (input shape, normalisation)."""
    return detector._model_spec


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


def create_model(
    detector: Any, bn_momentum: float | None, replicas: int = 1, mixed_precision: str = "off", jit_compile: bool = False
) -> None:
    """``detector._create_model()``, with another BatchNorm momentum, the loss divided per replica,
    mixed precision and XLA.

    Setting ``layer.momentum`` after the model is built has no effect on these
    (synchronized) BatchNorm layers: measured, a momentum-0 update moved the moving
    variance by 1%, as 0.99 does. The config's ``norm_momentum`` is read at build time.

    With ``replicas`` > 1 each replica's loss is rescaled so that the replicas' gradients, which
    Keras sums, add up to the one-device gradient of the same global batch. Model Maker's
    ``train_step`` does not: N replicas would take N times the step. And its loss divides by
    the positive anchors of the replica's own images, where one device divides by those of
    the whole batch; so the model loss is re-normalised by the all-reduced count (as
    tf-models' RetinaNet task does) and the L2 term, which every replica adds, divided by N.
    Measured, one step of 32 images from the same weights: 2 CPU replicas moved the backbone
    and decoder 1.98x as far as one device without any rescaling. With this rescaling the
    2-replica step is the one-device step: in float64 they agree to 8e-12 (one step,
    bench/experiment_replica_step.py, BENCHMARKS.md). In float32 they differ by ~13%, as one
    device differs from itself with the batch's halves swapped (10%) and from the exact step
    (13%): float32 rounding, growing from the head (4%) down through the BatchNorm layers, not
    the replicas. It turns the step and keeps its length (tests/test_distribute.py bounds both).

    ``mixed_precision`` (``float16`` or ``bfloat16``) must already be Keras' global policy (see
    ``precision_policy``): the layers compute in it, and the model's outputs are cast to float32
    before the loss, as tf-models' own RetinaNet task does. Keras' ``compile`` adds loss scaling
    for float16. ``jit_compile`` reaches Model Maker's ``compile`` call in ``_train_model``
    (and swaps the FPN's upsampling for an XLA-compilable equal, see ``_get_model_config``).
    """
    if bn_momentum is None and replicas == 1 and mixed_precision == "off" and not jit_compile:
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
            if jit_compile:
                # XLA has no kernel for the gradient of Keras' UpSampling2D (ResizeNearestNeighborGrad), on
                # CPUs and GPUs alike. tf-models' other FPN upsampling (reshape + tile) computes the same
                # nearest-neighbour x2 and its gradient compiles; the FPN's variables are the same.
                config.decoder.fpn.use_keras_layer = False
            return config

        def call(self, *args: Any, **kwargs: Any) -> Any:
            outputs = super().call(*args, **kwargs)
            if mixed_precision == "off":
                return outputs
            return tf.nest.map_structure(lambda t: tf.cast(t, tf.float32) if t.dtype.is_floating else t, outputs)

        def compile(self, *args: Any, **kwargs: Any) -> None:
            super().compile(*args, **kwargs, jit_compile=jit_compile)

        def train_step(self, data: Any) -> Any:
            if replicas == 1:
                return super().train_step(data)
            tf.keras.backend.set_learning_phase(1)  # as Model Maker's train_step, with the loss rescaled
            x, y = data
            positives = tf.reduce_sum(y["box_weights"])  # compute_loss divides by this + 1
            everywhere = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, positives)
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x, y, y_pred)  # updates the (per-replica) loss metrics
                l2 = tf.add_n(self._model.losses) if self._model.losses else tf.constant(0.0)
                scaled = (loss - l2) * (positives + 1.0) / (everywhere + 1.0) + l2 / replicas
            self._validate_target_and_loss(y, loss)
            self.optimizer.minimize(scaled, self.trainable_variables, tape=tape)
            return self.compute_metrics(x, y, y_pred)

    with contextlib.redirect_stdout(io.StringIO()):
        detector._model = Model(
            model_spec=detector._model_spec, model_options=detector._model_options, num_classes=detector._num_classes
        )


@contextlib.contextmanager
def precision_policy(mixed_precision: str) -> Iterator[None]:
    """Keras' global dtype policy for one block (``mixed_float16``/``mixed_bfloat16``), float32 again after it.

    Layers take the global policy when they are built, so it must be set before the model is;
    afterwards it goes back so that anything built later in this process (export, evaluation,
    the next test) is float32 again.
    """
    if mixed_precision == "off":
        yield
        return
    import tensorflow as tf

    tf.keras.mixed_precision.set_global_policy(f"mixed_{mixed_precision}")
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def create_and_train(
    detector: Any,
    train_data: Any,
    val_data: Any,
    bn_momentum: float | None,
    mixed_precision: str = "off",
    jit_compile: bool = False,
    epochs_done: int = 0,
) -> None:
    """Model Maker's ``_create_and_train_model``, in the strategy's scope, with an optional BatchNorm momentum,
    mixed precision, XLA, and the training input preprocessed on every core (``parallel_preprocessing``).
    ``epochs_done``: the epochs Keras' BackupAndRestore restores (the run resumes after them).

    From scratch, the default momentum (0.99) leaves the moving statistics far behind
    the quickly changing weights: measured on 239 synthetic images after 6 epochs, the
    same batches scored 0.83 loss with batch statistics and 1.85 with the moving ones,
    which is the train/validation gap. A lower momentum (0.9) lets them keep up.
    """
    from mediapipe_model_maker.python.core.utils import model_util

    # Model Maker 0.2.1.4 builds a strategy but never enters it: do it here.
    strategy = detector._hparams.get_strategy()
    replicas = strategy.num_replicas_in_sync if strategy else 1
    with strategy.scope() if strategy else contextlib.nullcontext(), precision_policy(mixed_precision):
        detector._optimizer = detector._create_optimizer(
            model_util.get_steps_per_epoch(steps_per_epoch=None, batch_size=detector._hparams.batch_size, train_data=train_data)
        )
        create_model(detector, bn_momentum, replicas, mixed_precision, jit_compile)
        parallel_preprocessing(train_data, detector._preprocessor, epochs_done)
        detector._train_model(train_data, val_data, preprocessor=detector._preprocessor)
    detector._save_float_ckpt()  # on every worker: saving reduces BatchNorm's moving statistics over all replicas


# Model Maker's training augmentation (preprocessor.py with tf-models' preprocess_ops): scale jitter in
# [0.5, 2] then a random crop, and a horizontal flip with probability 0.5. Every draw passes seed=1.
_AUG_SEED = 1
_FLIP_PROBABILITY = 0.5


def _augmentation_draws(_: Any) -> tuple[Any, Any, Any]:
    """The three random draws of Model Maker's training preprocessor, made by the same ops with the same seeds.

    With op determinism on (the train stage turns it on), TensorFlow runs a ``Dataset.map`` whose
    function holds a stateful random op one element at a time, ignoring ``num_parallel_calls``:
    Model Maker's whole preprocessing (normalize, resize, anchor labelling) then uses one core.
    These ops alone go in that serial map; they make the same numbers for element i as
    Model Maker's (each op is its own Philox stream seeded by (global seed, 1)).
    """
    import tensorflow as tf

    flip = tf.random.uniform([], seed=_AUG_SEED)
    scale = tf.random.uniform([], 0.5, 2.0, seed=_AUG_SEED)
    offset = tf.random.uniform([2], 0, 1, seed=_AUG_SEED)
    return flip, scale, offset


def _resize_and_crop(image: Any, desired_size: Any, padded_size: Any, random_scale: Any, offset_fraction: Any) -> Any:
    """tf-models' ``preprocess_ops.resize_and_crop_image`` with scale jitter, its random draws given as inputs."""
    import tensorflow as tf

    with tf.name_scope("resize_and_crop_image"):
        image_size = tf.cast(tf.shape(image)[0:2], tf.float32)
        scaled_size = tf.round(random_scale * tf.cast(desired_size, tf.float32))
        scale = tf.minimum(scaled_size[0] / image_size[0], scaled_size[1] / image_size[1])
        scaled_size = tf.round(image_size * scale)
        image_scale = scaled_size / image_size
        max_offset = scaled_size - tf.cast(desired_size, tf.float32)
        max_offset = tf.where(tf.less(max_offset, 0), tf.zeros_like(max_offset), max_offset)
        offset = tf.cast(max_offset * offset_fraction, tf.int32)
        scaled_image = tf.image.resize(image, tf.cast(scaled_size, tf.int32), method=tf.image.ResizeMethod.BILINEAR)
        scaled_image = scaled_image[offset[0] : offset[0] + desired_size[0], offset[1] : offset[1] + desired_size[1], :]
        output_image = tf.image.pad_to_bounding_box(scaled_image, 0, 0, padded_size[0], padded_size[1])
        image_info = tf.stack([image_size, tf.cast(desired_size, dtype=tf.float32), image_scale, tf.cast(offset, tf.float32)])
        return output_image, image_info


def _train_preprocess(preprocessor: Any) -> Any:
    """Model Maker's ``Preprocessor.__call__(data, is_training=True)`` with its random draws as inputs (no random op)."""
    import tensorflow as tf
    from official.vision.ops import box_ops, preprocess_ops

    pre = preprocessor

    def preprocess(data: Any, draws: tuple[Any, Any, Any]) -> Any:
        flip, random_scale, offset_fraction = draws
        classes, boxes, image = data["groundtruth_classes"], data["groundtruth_boxes"], data["image"]
        crowd = data["groundtruth_is_crowd"]  # all False unless the cache flags ignore regions
        image_shape = tf.shape(input=image)[0:2]
        image = preprocess_ops.normalize_image(image, pre._mean_norm, pre._stddev_norm)
        with tf.name_scope("random_horizontal_flip"):
            do_flip = tf.less(flip, _FLIP_PROBABILITY)
            image = tf.cond(do_flip, lambda: preprocess_ops.horizontal_flip_image(image), lambda: image)
            boxes = tf.cond(do_flip, lambda: preprocess_ops.horizontal_flip_boxes(boxes), lambda: boxes)
        boxes = box_ops.denormalize_boxes(boxes, image_shape)
        image, image_info = _resize_and_crop(image, pre._output_size, pre._padded_size, random_scale, offset_fraction)
        boxes = preprocess_ops.resize_and_crop_boxes(boxes, image_info[2, :], image_info[1, :], image_info[3, :])
        indices = box_ops.get_non_empty_box_indices(boxes)
        boxes, classes, crowd = tf.gather(boxes, indices), tf.gather(classes, indices), tf.gather(crowd, indices)
        objects = tf.where(tf.logical_not(crowd))[:, 0]  # every box when there is no ignore region: Model Maker's call
        boxes, classes, regions = tf.gather(boxes, objects), tf.gather(classes, objects), tf.gather(boxes, tf.where(crowd)[:, 0])
        cls_targets, box_targets, _, cls_weights, box_weights = pre._anchor_labeler.label_anchors(
            pre.anchor_boxes, boxes, tf.expand_dims(classes, axis=1)
        )
        cls_weights = tf.cond(
            tf.size(regions) > 0,
            lambda: ignore_anchors(pre, cls_weights, box_weights, boxes, regions),
            lambda: cls_weights,
        )
        labels = {
            "cls_targets": cls_targets,
            "box_targets": box_targets,
            "anchor_boxes": pre.anchor_boxes,
            "cls_weights": cls_weights,
            "box_weights": box_weights,
            "image_info": image_info,
        }
        return tf.cast(image, dtype=pre._dtype), labels

    return preprocess


def ignore_anchors(preprocessor: Any, cls_weights: Any, box_weights: Any, boxes: Any, regions: Any) -> Any:
    """``cls_weights`` with 0 on the anchors an ignore region would claim: not taught "background" there.

    tf-models' ``AnchorLabeler`` (as installed) has no ignore class: a ground truth of class -1
    gives its anchors target -1, which the loss one-hot encodes as background, and a zero
    ``gt_weights`` also silences the negatives whose best overlap is that box (with no overlap
    at all the matcher's argmax picks the first box: every such anchor, when the region is first).
    So the anchors are labelled from the objects alone, exactly as Model Maker does, and then
    the anchors that match a region rather than an object (the labeler's own matcher over
    objects + regions: IoU >= 0.5, or a region's best anchor) and are not positives of an
    object get classification weight 0. Their box weight is already 0 (not positives).
    """
    import tensorflow as tf

    labeler = preprocessor._anchor_labeler
    anchors = tf.concat([tf.reshape(level, [-1, 4]) for level in preprocessor.anchor_boxes.values()], axis=0)
    similarity = labeler.similarity_calc(anchors, tf.concat([boxes, regions], axis=0))
    match, indicator = labeler.matcher(similarity)
    claimed = tf.logical_and(match >= tf.cast(tf.shape(boxes)[0], match.dtype), indicator > 0)
    return tf.where(tf.logical_and(claimed, box_weights <= 0), tf.zeros_like(cls_weights), cls_weights)


def training_dataset(data: Any, preprocessor: Any, batch_size: int, shuffle: bool, drop_remainder: bool = False) -> Any:
    """What ``data.gen_tf_dataset(batch_size, is_training=True, shuffle, preprocessor)`` yields, element for
    element and bit for bit, with the preprocessing in parallel.

    Model Maker's pipeline is map(preprocess, AUTOTUNE) -> shuffle(3 x batch) -> batch -> prefetch, but
    under op determinism its map runs serially (see ``_augmentation_draws``). Here only the draws
    run serially, zipped beside the decoded examples, and the heavy part runs on every core in
    order (``deterministic=True``). The shuffle is created at the same point with the same
    arguments, so it takes the same seed (``tests/test_speed.py`` compares both pipelines).
    """
    import tensorflow as tf

    examples = data._dataset
    draws = tf.data.Dataset.range(len(data)).map(_augmentation_draws)  # serial: stateful random ops
    dataset = tf.data.Dataset.zip((examples, draws)).map(
        _train_preprocess(preprocessor), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    if shuffle:
        dataset = dataset.shuffle(buffer_size=min(len(data), 3 * batch_size))  # Model Maker's buffer
    return dataset.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def skip_shuffles(dataset: Any, epochs: int) -> Any:
    """Advance ``dataset``'s shuffle past ``epochs`` epochs, so that a resumed ``fit()`` trains epoch e on
    the order an uninterrupted run gives epoch e (the same weights, byte for byte).

    Each new iterator of a shuffled dataset draws the next order from the shuffle's seed
    generator, and Keras makes one per epoch: a resumed process would otherwise give its first
    epoch the order of epoch 1. Making an iterator draws the order without reading an element
    (the augmentation draws repeat each epoch, they need no advancing).
    """
    for _ in range(epochs):
        iter(dataset)
    return dataset


def parallel_preprocessing(data: Any, preprocessor: Any, epochs_done: int = 0) -> None:
    """Make Model Maker's training input for ``data`` come from ``training_dataset`` (same elements, all cores);
    the first one made skips the shuffles of ``epochs_done`` epochs (``skip_shuffles``)."""
    model_maker = data.gen_tf_dataset
    skip = [epochs_done]  # the float phase's fit() only: QAT's starts afresh

    def gen_tf_dataset(
        batch_size: int = 1,
        is_training: bool = False,
        shuffle: bool = False,
        preprocess: Any = None,
        drop_remainder: bool = False,
    ) -> Any:
        if is_training and preprocess is preprocessor:
            dataset = training_dataset(data, preprocessor, batch_size, shuffle, drop_remainder)
            return skip_shuffles(dataset, skip.pop()) if skip else dataset
        return model_maker(batch_size, is_training, shuffle, preprocess, drop_remainder)

    data.gen_tf_dataset = gen_tf_dataset


CACHE_BATCH = 32  # images per round trip from tf.data to the writing thread


def write_coco_cache(folder: Path, cache_dir: Path, parallel: bool = True) -> tuple[Any, int]:
    """Model Maker's TFRecord cache of a COCO ``folder`` (see ``model_maker_folder``): (cache files, images written).

    The bytes are those of Model Maker's ``COCOCacheFilesWriter`` (``Dataset.from_coco_folder``), which
    decodes every JPEG in full only to learn its size, one after another. Here the size comes from
    the JPEG header (``extract_jpeg_shape``: the dimensions a full decode produces), and each file
    is still decoded to its last byte at 1/8 scale (libjpeg's DCT scaling skips most of the inverse
    transform, not the entropy decoding), so a truncated or corrupt file stops here, named, as it
    did (tested); about 10% less CPU than a full decode. tf.data does it on every core, in
    order (``deterministic=True``), and hands the results over in batches, while this thread
    builds the same ``tf.train.Example``s and writes them round-robin over the same shards.
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
    # took 0.6-1.1 s to wind down after the last image in about half the runs (bench/bench_cache.py).
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


def speed_settings(detector: Any) -> dict[str, Any]:
    """How the trained model actually ran, read from it: compute dtype, XLA, loss scaling, starting learning rate."""
    model = detector._model
    schedule = detector._optimizer._learning_rate  # the schedule (``optimizer.learning_rate`` is its current value)
    return {
        "compute_dtype": model._model.backbone.compute_dtype,  # the global policy when the layers were built
        "jit_compile": bool(model.jit_compile),
        "loss_scaling": type(model.optimizer).__name__.startswith("LossScale"),
        "initial_learning_rate": float(schedule.initial_learning_rate),  # Model Maker's learning_rate x batch / 256
    }


def tf_message(err: Exception) -> str:
    """TensorFlow's error text without its ``{{function_node ...}}`` prefix, first line only."""
    return re.sub(r"\{\{[^}]*\}\}\s*", "", str(err)).strip().splitlines()[0][:200]


def restore_trained_float(
    detector: Any, train_data: Any, checkpoint: Path, bn_momentum: float | None, jit_compile: bool = False
) -> None:
    """Rebuild the float model (as ``create_and_train`` built it, optimizer included) from a finished float phase's checkpoint.

    QAT refuses mixed precision, so a run that reaches this point trained in float32.
    """
    from mediapipe_model_maker.python.core.utils import model_util

    strategy = detector._hparams.get_strategy()
    replicas = strategy.num_replicas_in_sync if strategy else 1
    with strategy.scope() if strategy else contextlib.nullcontext():
        detector._optimizer = detector._create_optimizer(
            model_util.get_steps_per_epoch(steps_per_epoch=None, batch_size=detector._hparams.batch_size, train_data=train_data)
        )
        create_model(detector, bn_momentum, replicas, jit_compile=jit_compile)
        detector._model.load_checkpoint(str(checkpoint), include_last_layer=True)
    parallel_preprocessing(train_data, detector._preprocessor)  # QAT's input, as after create_and_train


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
