"""Model Maker's object-detector architectures and the start points they can fine-tune from, without TensorFlow.

``ARCHITECTURES`` mirrors ``mediapipe_model_maker/python/vision/object_detector/model_spec.py``
(0.2.1.4): the folder Model Maker expects under ``$TMPDIR/model_maker/`` and the checkpoint URL.
``tests/test_download.py`` checks this table against the installed package.

``START_POINTS`` names what ``download.pretrained`` can fetch: each architecture's COCO
checkpoint (Model Maker's bucket, 403 since early 2026) and Keras Applications' ImageNet
MobileNetV2, whose backbone fits both MobileNetV2 architectures (decoder and head start
from the seeded scratch initialisation).
"""

from __future__ import annotations

from dataclasses import dataclass

_BUCKET = "https://storage.googleapis.com/tf_model_garden/vision/qat"


@dataclass(frozen=True)
class Architecture:
    name: str  # our params.yaml name
    enum_name: str  # object_detector.SupportedModels member
    folder: str  # DownloadedFiles.path under $TMPDIR/model_maker/
    checkpoint_url: str
    input_size: int


ARCHITECTURES = {
    arch.name: arch
    for arch in (
        Architecture(
            "mobilenet_v2",
            "MOBILENET_V2",
            "object_detector/mobilenetv2_i256",
            f"{_BUCKET}/mobilenetv2_ssd_coco/mobilenetv2_ssd_i256_ckpt.tar.gz",
            256,
        ),
        Architecture(
            "mobilenet_v2_i320",
            "MOBILENET_V2_I320",
            "object_detector/mobilenetv2_i320",
            f"{_BUCKET}/mobilenetv2_ssd_coco/mobilenetv2_ssd_i320_ckpt.tar.gz",
            320,
        ),
        Architecture(
            "mobilenet_multi_avg",
            "MOBILENET_MULTI_AVG",
            "object_detector/mobilenetmultiavg",
            f"{_BUCKET}/mobilenetv3.5_ssd_coco/mobilenetv3.5_ssd_i256_ckpt.tar.gz",
            256,
        ),
        Architecture(
            "mobilenet_multi_avg_i384",
            "MOBILENET_MULTI_AVG_I384",
            "object_detector/mobilenetmultiavg_i384",
            f"{_BUCKET}/mobilenetv2_ssd_coco/mobilenetv3.5_ssd_i384_ckpt.tar.gz",
            384,
        ),
    )
}


# keras/src/applications/mobilenet_v2.py (2.15): BASE_WEIGHT_PATH + the alpha-1.0, 224 px, no-top file.
# Keras publishes no hash for it (get_file is called without file_hash): the fetched sha256
# is recorded in models/pretrained/manifest.json; download.checkpoint_checksum pins one.
KERAS_MOBILENET_V2_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
)


@dataclass(frozen=True)
class StartPoint:
    name: str  # download.pretrained
    url: str  # the default download.checkpoint_url
    fits: tuple[str, ...]  # train.architecture values it can initialise
    kind: str  # "modelmaker": a COCO checkpoint tarball; "keras_imagenet": a Keras Applications h5 (backbone only)


IMAGENET = "mobilenet_v2_imagenet"
SCRATCH = "scratch"  # download.pretrained / train.init: no start point, a seeded random initialisation
START_POINTS = {
    IMAGENET: StartPoint(IMAGENET, KERAS_MOBILENET_V2_URL, ("mobilenet_v2", "mobilenet_v2_i320"), "keras_imagenet"),
    **{arch.name: StartPoint(arch.name, arch.checkpoint_url, (arch.name,), "modelmaker") for arch in ARCHITECTURES.values()},
}
