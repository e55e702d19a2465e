"""Every use of Model Maker 0.2.1.4's private API, in one package: an upgrade re-checks these files.

One module per job, so that dvc.yaml can declare exactly the code each stage runs:

- ``cache``: the TFRecord cache the cache stage writes and the others read; ``quiet_tensorflow``;
- ``build``: the detector built from our params, offline, or restored from the train stage;
- ``training``: the float phase (strategy, BatchNorm momentum, replicas, precision, input pipeline;
  imports ``build``);
- ``qat``: quantization-aware training and its checkpoint (imports ``build``; nothing imports back).

Stages import the submodules (``from trafficdet.modelmaker import build``). For scripts,
``trafficdet.modelmaker.<name>`` still finds every public name: it is looked up in its submodule
on each access (imported the first time), not copied here, so a test that patches the
submodule's attribute is seen through the package too.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "cache": """quiet_tensorflow model_maker_folder cache_record label_names load_dataset
        CACHE_BATCH write_coco_cache tf_message""",
    "build": """model_spec build_network write_init_checkpoint write_scratch_checkpoint
        build_detector restore_detector keras_model retinanet detector_spec preprocessor build_optimizer""",
    "training": """set_callbacks set_strategy set_dataset_options whole_batches create_model
        precision_policy create_and_train restore_trained_float speed_settings ignore_anchors
        training_dataset skip_shuffles parallel_preprocessing""",
    "qat": "convert_to_qat quantization_aware_training qat_checkpoint restore_qat_detector",
}
_SUBMODULE = {name: module for module, names in _PUBLIC.items() for name in names.split()}

__all__ = sorted(_SUBMODULE)


def __getattr__(name: str) -> Any:
    if name not in _SUBMODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_SUBMODULE[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULE])
