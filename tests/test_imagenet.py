"""Keras Applications' MobileNetV2 weights copied into tf-models' backbone compute what the Keras model computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from testkit.keras_weights import KERAS_LAYER_OF_LEVEL, keras_level_outputs

# Relative to the level's largest value (up to ~6 at level 6 with the stand-in's weights). Measured:
# 1.3e-6 at most (float32 convolutions summed in another order); two BatchNorms swapped: far more.
TOLERANCE = 1e-5


def largest_gap(backbone, weights_file: Path, images) -> dict[str, float]:
    """Per level: max |tf-models backbone output - the matching Keras layer's output| / max |Keras output|."""
    ours = backbone(images, training=False)
    theirs = keras_level_outputs(weights_file, images)
    assert set(ours) == set(KERAS_LAYER_OF_LEVEL), sorted(ours)
    return {level: float(np.abs(ours[level].numpy() - theirs[level]).max() / np.abs(theirs[level]).max()) for level in theirs}


@pytest.fixture(scope="module")
def filled_backbone(keras_weights: Path, tmp_path_factory: pytest.TempPathFactory):
    """Model Maker's MobileNetV2 detector network (as training builds it), its backbone filled from the stand-in file."""
    from trafficdet import modelmaker as mm
    from trafficdet.imagenet import copy_into_backbone

    spec = mm.model_spec("mobilenet_v2", tmp_path_factory.mktemp("init"))
    backbone = mm.build_network(spec, 4, 3e-5).backbone
    assert copy_into_backbone(keras_weights, backbone) == 260  # 52 kernels + 52 x 4 BatchNorm variables
    return backbone


def test_copied_backbone_computes_the_keras_models_levels(filled_backbone, keras_weights: Path) -> None:
    """Random weights (every value, BatchNorm statistics included): each output level equals the Keras
    block that computes it, on the same images, within 1e-5 (relative); with two same-shaped BatchNorms swapped it does not."""
    import tensorflow as tf

    images = tf.random.stateless_uniform([2, 256, 256, 3], seed=[3, 4], minval=-1.0, maxval=1.0)
    gaps = largest_gap(filled_backbone, keras_weights, images)
    assert max(gaps.values()) < TOLERANCE, gaps

    # A copy that put two same-shaped BatchNorm layers' values in each other's place would pass a
    # check of shapes and values alone; the outputs show it.
    layers = [layer for layer in filled_backbone.submodules if isinstance(layer, tf.keras.layers.BatchNormalization)]
    first, second = next((a, b) for i, a in enumerate(layers) for b in layers[i + 1 :] if a.gamma.shape == b.gamma.shape)
    saved = [v.numpy() for v in first.weights], [v.numpy() for v in second.weights]
    try:
        for ours, theirs in zip(first.weights, saved[1], strict=True):
            ours.assign(theirs)
        for ours, theirs in zip(second.weights, saved[0], strict=True):
            ours.assign(theirs)
        swapped = largest_gap(filled_backbone, keras_weights, images)
    finally:
        for layer, values in zip((first, second), saved, strict=True):
            for variable, value in zip(layer.weights, values, strict=True):
                variable.assign(value)
    assert max(swapped.values()) > 1000 * TOLERANCE, swapped
