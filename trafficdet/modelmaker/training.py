"""The train stage's float phase: Model Maker's training with our strategy, BatchNorm momentum,
replica loss scaling, mixed precision, XLA and an input pipeline that uses every core.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trafficdet.modelmaker.build import build_optimizer


def set_callbacks(detector: Any, callbacks: list[Any]) -> None:
    """Model Maker's ``fit()`` takes its callbacks from this attribute."""
    detector._callbacks = callbacks


def set_strategy(detector: Any, strategy: Any) -> None:
    """Use our tf.distribute strategy (made before TensorFlow started), not Model Maker's."""
    detector._hparams._strategy = strategy


def set_dataset_options(data: Any, options: Any) -> None:
    """Apply ``tf.data.Options`` (e.g. the auto-shard policy) to a Model Maker dataset."""
    data._dataset = data._dataset.with_options(options)


def whole_batches(data: Any, batch_size: int) -> None:
    """Cut a dataset to whole batches: a partial last batch can leave a replica with no images.

    The global batch is split in order (7 images over 2 replicas of 16: 7 and 0), and Model
    Maker's model fails on an empty batch (a BatchNormalization's "Incompatible shapes").
    Training already runs whole batches only (steps = images // batch_size).
    """
    usable = len(data) - len(data) % batch_size
    data._dataset = data._dataset.take(usable)
    data._size = usable


def create_model(
    detector: Any, bn_momentum: float | None, replicas: int = 1, mixed_precision: str = "off", jit_compile: bool = False
) -> None:
    """``detector._create_model()``, with another BatchNorm momentum, the loss rescaled per replica,
    mixed precision and XLA.

    The momentum goes into the config (``norm_momentum``), read at build time: setting
    ``layer.momentum`` on the built (synchronized) BatchNorm layers has no effect.
    Keras sums the replicas' gradients and Model Maker's ``train_step`` does not compensate
    (2 replicas took a 1.98x step), so each replica's loss is re-normalised by the all-reduced
    count of positive anchors (as tf-models' RetinaNet task does) and its L2 term divided by N:
    the 2-replica step is then the one-device step, to float32 rounding (see BENCHMARKS.md).
    ``mixed_precision`` must already be Keras' global policy (``precision_policy``); the outputs
    are cast to float32 before the loss. ``jit_compile`` reaches Model Maker's ``compile``.
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
                # XLA has no kernel for the gradient of Keras' UpSampling2D
                # (ResizeNearestNeighborGrad), on CPUs and GPUs alike. tf-models' other FPN
                # upsampling (reshape + tile) computes the same nearest-neighbour x2 and its
                # gradient compiles; the FPN's variables are the same.
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
    """Keras' global dtype policy (``mixed_float16``/``mixed_bfloat16``) for a block, then float32.

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
    """Model Maker's ``_create_and_train_model``, in the strategy's scope, with ``create_model``'s
    options and the training input preprocessed on every core (``parallel_preprocessing``).
    ``epochs_done``: the epochs Keras' BackupAndRestore restores (the run resumes after them).

    ``bn_momentum``: from scratch, Model Maker's 0.99 leaves BatchNorm's moving statistics far
    behind the weights (the train/validation loss gap); 0.9 lets them keep up (see BENCHMARKS.md).
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
        build_optimizer(detector._optimizer, detector._model)
        detector._train_model(train_data, val_data, preprocessor=detector._preprocessor)
    detector._save_float_ckpt()  # on every worker: saving reduces BatchNorm's moving statistics over all replicas


def restore_trained_float(
    detector: Any, train_data: Any, checkpoint: Path, bn_momentum: float | None, jit_compile: bool = False
) -> None:
    """Rebuild the float model (as ``create_and_train`` built it, optimizer included) from a
    finished float phase's checkpoint.

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


def speed_settings(detector: Any) -> dict[str, Any]:
    """How the trained model ran, read from it: dtype, XLA, loss scaling, first learning rate."""
    model = detector._model
    schedule = detector._optimizer._learning_rate  # the schedule (``optimizer.learning_rate`` is its current value)
    return {
        "compute_dtype": model._model.backbone.compute_dtype,  # the global policy when the layers were built
        "jit_compile": bool(model.jit_compile),
        "loss_scaling": type(model.optimizer).__name__.startswith("LossScale"),
        "initial_learning_rate": float(schedule.initial_learning_rate),  # Model Maker's learning_rate x batch / 256
    }


# Model Maker's training augmentation (preprocessor.py with tf-models' preprocess_ops): scale
# jitter in [0.5, 2] then a random crop, and a horizontal flip with probability 0.5. Every draw
# passes seed=1.
_AUG_SEED = 1
_FLIP_PROBABILITY = 0.5


def _augmentation_draws(_: Any) -> tuple[Any, Any, Any]:
    """The three random draws of Model Maker's training preprocessor: the same ops, the same seeds.

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
    """tf-models' ``resize_and_crop_image`` with scale jitter, its random draws given as inputs."""
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
    """Model Maker's ``Preprocessor.__call__(data, is_training=True)``, its draws as inputs."""
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
    """``cls_weights`` with 0 on the anchors an ignore region claims: not taught "background".

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
    """What ``data.gen_tf_dataset(batch_size, is_training=True, shuffle, preprocessor)`` yields,
    element for element and bit for bit, with the preprocessing in parallel.

    Model Maker's pipeline is map(preprocess, AUTOTUNE) -> shuffle(3 x batch) -> batch -> prefetch,
    but under op determinism its map runs serially (see ``_augmentation_draws``). Here only the draws
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
    """Advance ``dataset``'s shuffle past ``epochs`` epochs, so that a resumed ``fit()`` trains
    epoch e on the order an uninterrupted run gives epoch e (the same weights, byte for byte).

    Each new iterator of a shuffled dataset draws the next order from the shuffle's seed
    generator, and Keras makes one per epoch: a resumed process would otherwise give its first
    epoch the order of epoch 1. Making an iterator draws the order without reading an element
    (the augmentation draws repeat each epoch, they need no advancing).
    """
    for _ in range(epochs):
        iter(dataset)
    return dataset


def parallel_preprocessing(data: Any, preprocessor: Any, epochs_done: int = 0) -> None:
    """Make Model Maker's training input for ``data`` come from ``training_dataset`` (same
    elements, all cores); the first one made skips ``epochs_done`` epochs' shuffles."""
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
