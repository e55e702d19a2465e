"""A stand-in for Keras Applications' ImageNet MobileNetV2 weights file, for offline tests.

The real file (``KERAS_MOBILENET_V2_URL``) cannot be fetched here. This writes a file in
its exact layout (Keras' HDF5 weights format, the same layers and shapes: MobileNetV2,
alpha 1.0, no top) holding seeded random values instead of ImageNet's, so a test can
tell whether every backbone variable came from the file. Served from the fixture tree
under the real URL's path, the real download code fetches it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from trafficdet.architectures import KERAS_MOBILENET_V2_URL

# Where the file sits in a fixture tree: the real URL's path, so only the host changes.
KERAS_WEIGHTS_PATH = urlsplit(KERAS_MOBILENET_V2_URL).path.lstrip("/")


def write_random_weights(path: Path, *, seed: int = 0, alpha: float = 1.0) -> Path:
    """Save a MobileNetV2 (``alpha``, no top) with seeded random weights as a Keras ``.h5`` weights file.

    Every value is random, BatchNorm statistics included (a fresh model's are 0 and 1,
    which would also match an untouched backbone); variances stay positive.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    model = tf.keras.applications.MobileNetV2(input_shape=(224, 224, 3), alpha=alpha, include_top=False, weights=None)
    for variable in model.weights:
        shape = variable.shape.as_list()
        if "moving_variance" in variable.name or "gamma" in variable.name:
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        variable.assign(value.astype(np.float32))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(path), save_format="h5")
    return path


def add_to_fixture(root: Path, *, seed: int = 0) -> Path:
    """Write the stand-in into a fixture tree under the real URL's path; return the file."""
    return write_random_weights(Path(root) / KERAS_WEIGHTS_PATH, seed=seed)


# Where tf-models' MobileNetV2 backbone puts each output level (its ``is_output`` blocks and the last
# 1x1 convolution), named by the Keras Applications layer that computes the same tensor.
KERAS_LAYER_OF_LEVEL = {
    "2": "block_2_add",  # stride 4: the second 24-filter block
    "3": "block_5_add",  # stride 8: the third 32-filter block
    "4": "block_12_add",  # stride 16: the third 96-filter block
    "5": "block_16_project_BN",  # stride 32: the 320-filter block (no residual)
    "6": "out_relu",  # the 1280-filter 1x1 convolution, BatchNorm and ReLU6
}


def keras_level_outputs(weights_file: Path, images: Any) -> dict[str, Any]:
    """Keras Applications' MobileNetV2 (alpha 1.0, no top) with ``weights_file``, run on ``images`` (N x S x S x 3,
    normalised to [-1, 1]) in inference mode: the output of the layer matching each tf-models level, as numpy."""
    import tensorflow as tf

    model = tf.keras.applications.MobileNetV2(input_shape=tuple(images.shape[1:]), alpha=1.0, include_top=False, weights=None)
    model.load_weights(str(weights_file))
    taps = tf.keras.Model(model.input, [model.get_layer(name).output for name in KERAS_LAYER_OF_LEVEL.values()])
    return {level: value.numpy() for level, value in zip(KERAS_LAYER_OF_LEVEL, taps(images, training=False), strict=True)}
