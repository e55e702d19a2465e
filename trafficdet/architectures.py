"""Model Maker's object-detector architectures, without importing TensorFlow.

Mirrors ``mediapipe_model_maker/python/vision/object_detector/model_spec.py`` (0.2.1.4):
the folder Model Maker expects under ``$TMPDIR/model_maker/`` and the checkpoint URL.
``tests/test_download.py`` checks this table against the installed package.
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
