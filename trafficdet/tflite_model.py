"""The TFLite file the app loads: the trained network followed by the Keras model's own detection step.

Model Maker's export stops at the network's raw outputs and leaves decoding and NMS to
MediaPipe Tasks, which keeps one class per anchor and suppresses across classes at IoU 0.3,
while the Keras model (tf-models' DetectionGenerator v2, which Model Maker evaluates with)
suppresses per class at IoU 0.5. The app then scored below the model it came from
(docs/app.md). This file ends in the Keras step instead: boxes decoded and clipped by
tf-models' own code, then per class the top ``pre_nms_top_k`` scores, NMS at the Keras IoU
and score threshold, and the best ``max_num_detections`` over all classes. Tasks reads its
four outputs as a model with NMS inside and adds no NMS of its own. Fed the same input
tensor it returns the Keras detections (tests/test_learned_model.py).

Written by hand because neither library route works here: tf-models' ``nms_version='tflite'``
(the TFLite_Detection_PostProcess op) converts to constant outputs under TF 2.15, and its v2
step converts to 55 subgraphs (while loops), which Tasks refuses (it runs one subgraph). The
per-class loop below is unrolled over the K classes with builtin ops (TOPK_V2,
NON_MAX_SUPPRESSION_V5, GATHER), so the file stays one subgraph.
"""

from __future__ import annotations

from typing import Any

from trafficdet.modelmaker.build import detector_spec, preprocessor, retinanet

DETECTION_STEP = "detection_step"  # the name scope of every op after the network
# Op types only the detection step uses (the network's are convolutions, adds, multiplies and
# resizes): kept float by type too, since fused ops carry joined names the node list may miss.
STEP_ONLY_OPS = [
    *("LOGISTIC", "EXP", "RESHAPE", "SLICE", "STRIDED_SLICE", "SPLIT", "SUB", "RELU", "MINIMUM", "MAXIMUM"),
    *("CONCATENATION", "TOPK_V2", "GATHER"),
]


def detection_settings(detector: Any) -> dict[str, Any]:
    """What the detection step does, from tf-models' detection generator config as Model Maker builds
    it (models/metadata.json and the model card state it): no box below ``score_threshold`` leaves the file."""
    config = retinanet(detector).detection_generator.get_config()
    return {
        "nms": "per class",
        "score_threshold": config["pre_nms_score_threshold"],
        "nms_iou_threshold": config["nms_iou_threshold"],
        "pre_nms_top_k": config["pre_nms_top_k"],
        "max_detections": config["max_num_detections"],
    }


def detection_function(detector: Any) -> Any:
    """A concrete function: normalised [1, S, S, 3] image -> (boxes, classes, scores, count), Tasks' order.

    Boxes are [ymin, xmin, ymax, xmax] as fractions of the model input; classes are 0..K-1,
    indexing the labels without ``background``.
    """
    import tensorflow as tf

    network = retinanet(detector)
    generator = network.detection_generator
    config = generator.get_config()
    height, width = detector_spec(detector).input_image_shape[:2]
    anchors = {level: boxes[tf.newaxis] for level, boxes in preprocessor(detector).anchor_boxes.items()}
    scale = tf.constant([height, width, height, width], tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([1, height, width, 3], tf.float32)])
    def detect(images: Any) -> tuple[Any, Any, Any, Any]:
        features = network.decoder(network.backbone(images, training=False), training=False)
        raw_scores, raw_boxes, _ = network.head(features, training=False)
        with tf.name_scope(DETECTION_STEP):  # int8 leaves it float (convert)
            # tf-models' own decoding (a private method: the one the Keras step runs): background
            # dropped, sigmoid scores, boxes decoded from the anchors and clipped to the input.
            boxes, scores, _ = generator._decode_multilevel_outputs(
                raw_boxes, raw_scores, anchors, tf.constant([[height, width]], tf.float32)
            )
            best_boxes, best_classes, best_scores, count = per_class_nms(boxes[0, :, 0, :], scores[0], config)
            return (best_boxes / scale)[tf.newaxis], best_classes[tf.newaxis], best_scores[tf.newaxis], count[tf.newaxis]

    return detect.get_concrete_function()


def per_class_nms(boxes: Any, scores: Any, config: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """tf-models' class-aware ``_generate_detections_v2`` for one image, in builtin TFLite ops (one subgraph).

    ``boxes`` [N, 4], ``scores`` [N, K] (background dropped); ``config`` the detection generator's
    (``pre_nms_top_k``, ``pre_nms_score_threshold``, ``nms_iou_threshold``, ``max_num_detections``).
    Per class: the top ``pre_nms_top_k`` scores, NMS at the IoU and score threshold; then the best
    ``max_num_detections`` over all classes. Returns (boxes [M, 4], classes [M] as floats 0..K-1,
    scores [M], count), padded with score 0 (tests/test_tflite_model.py compares it with tf-models').
    """
    import tensorflow as tf

    top = config["max_num_detections"]
    kept_boxes, kept_scores, kept_classes = [], [], []
    for k in range(scores.shape[1]):
        class_scores, order = tf.math.top_k(scores[:, k], k=min(boxes.shape[0], config["pre_nms_top_k"]))
        class_boxes = tf.gather(boxes, order)
        chosen, chosen_scores, _ = tf.raw_ops.NonMaxSuppressionV5(
            boxes=class_boxes,
            scores=class_scores,
            max_output_size=top,
            iou_threshold=config["nms_iou_threshold"],
            score_threshold=config["pre_nms_score_threshold"],
            soft_nms_sigma=0.0,
            pad_to_max_output_size=True,  # padding: score 0, sorted last below
        )
        kept_boxes.append(tf.gather(class_boxes, chosen))
        kept_scores.append(chosen_scores)
        kept_classes.append(tf.fill([top], float(k)))
    best_scores, order = tf.math.top_k(tf.concat(kept_scores, 0), k=top)
    best_boxes = tf.gather(tf.concat(kept_boxes, 0), order)
    best_classes = tf.gather(tf.concat(kept_classes, 0), order)
    count = tf.reduce_sum(tf.cast(best_scores > 0, tf.float32))
    return best_boxes, best_classes, best_scores, count


def convert(detector: Any, quantization: Any = None) -> bytes:
    """The TFLite flatbuffer, without metadata; ``quantization`` is a Model Maker ``QuantizationConfig``.

    Given without its Keras object, the function is frozen (variables become constants), and
    that path keeps the outputs in the order returned (the saved-model path shuffles them).
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([detection_function(detector)])
    if quantization is not None:
        converter = quantization.set_converter_with_quantization(converter, preprocess=preprocessor(detector))
    # As Model Maker's export: builtins, with float where an op has no int8 kernel; and float
    # outputs (Tasks wants every output float or every one uint8; classes and a count are not uint8).
    converter.target_spec.supported_ops = (tf.lite.OpsSet.TFLITE_BUILTINS,)
    converter.inference_output_type = tf.float32
    if converter.representative_dataset is None:  # float32, float16, dynamic, QAT: nothing to calibrate
        return converter.convert()
    return calibrated_int8(converter)


def calibrated_int8(converter: Any) -> bytes:
    """Post-training int8 of the network only: the detection step stays float.

    Calibrated whole, the converter would quantize the detection step too (scores and boxes
    to 256 levels) and even NMS's constant inputs, which the NMS kernel then refuses. TF's
    quantization debugger is its documented way to keep chosen nodes float (selective
    quantization); it takes float input, which MediaPipe Tasks normalises from the metadata.
    The quantizer still leaves one int8 round trip on the scores after the sigmoid and on the
    box offsets, where it has their ranges (BENCHMARKS.md: int8 AP 0.395 against float 0.408).
    """
    import tensorflow as tf

    representative = converter.representative_dataset.input_gen
    converter.inference_input_type = tf.float32  # what the debugger's quantizer gives
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=representative)
    calibrated = tf.lite.Interpreter(model_content=debugger.calibrated_model).get_tensor_details()
    step = [tensor["name"] for tensor in calibrated if tensor["name"].startswith(f"{DETECTION_STEP}/")]
    debugger.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=STEP_ONLY_OPS, denylisted_nodes=step)
    return debugger.get_nondebug_quantized_model()


def with_metadata(model: bytes, detector: Any, labels: list[str]) -> tuple[bytes, str]:
    """``model`` with MediaPipe's metadata for a detector with NMS inside; and that metadata as JSON."""
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer, writer_utils
    from mediapipe.tasks.python.metadata.metadata_writers import object_detector as object_detector_writer

    spec = detector_spec(detector)
    writer = object_detector_writer.MetadataWriter.create_for_models_with_nms(
        model, spec.mean_rgb, spec.stddev_rgb, labels=metadata_writer.Labels().add(labels)
    )
    # The writer pairs (location, category, score, count) with the outputs in tensor-index order,
    # the TFLite_Detection_PostProcess op's numbering; a converted graph numbers them otherwise.
    # Tasks finds each output by this name, so name them in output order.
    for output, name in zip(writer.writer._output_mds, writer_utils.get_output_tensor_names(model), strict=True):
        output.tensor_name = name
    content, metadata_json = writer.populate()
    return bytes(content), metadata_json
