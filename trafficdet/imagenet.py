"""Keras Applications' ImageNet MobileNetV2 as the backbone of Model Maker's MobileNetV2 detector.

Model Maker's COCO checkpoints are gone (their bucket answers 403), and no package ships
them; Keras Applications still publishes ImageNet weights for MobileNetV2. tf-models'
``MobileNet(model_id='MobileNetV2')`` backbone is the same network: 52 convolution kernels
and 52 BatchNorm layers (epsilon 1e-3 on both) in the same order and shapes, so the
weights are copied by order, role by role, each shape checked. Written by hand because no
library maps Keras Applications weights onto tf-models backbones.

The weights file is downloaded data: before Keras reads it, ``check_weights_file`` refuses
anything in it that would make HDF5 read another file (external links, external storage,
virtual datasets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trafficdet.errors import PipelineError

# The variables a Keras MobileNetV2 without top holds, by the last part of their name.
ROLES = ("kernel", "depthwise_kernel", "gamma", "beta", "moving_mean", "moving_variance")
KERAS_INPUT_SHAPE = (224, 224, 3)  # the file's; convolution weights do not depend on the input size


def check_weights_file(path: Path) -> int:
    """Check ``path`` is a self-contained Keras HDF5 weights file; return its layer count.

    HDF5 can point outside the file (external links, external raw storage, virtual
    datasets): reading such a "weights" file would pull local files into the model.
    """
    import h5py

    def refuse(problem: str) -> PipelineError:
        return PipelineError(f"{path}: {problem}; not a Keras Applications weights file (delete it and rerun the download stage)")

    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise refuse(f"not an HDF5 file ({' '.join(str(err).split())})") from None
    with handle:
        if "layer_names" not in handle.attrs:
            raise refuse("no 'layer_names' attribute")
        pending: list[Any] = [handle]
        while pending:
            group = pending.pop()
            for name in group:
                link = group.get(name, getlink=True)
                if not isinstance(link, h5py.HardLink):
                    raise refuse(f"{group.name.rstrip('/')}/{name} is an HDF5 {type(link).__name__}, which points elsewhere")
                item = group[name]
                if isinstance(item, h5py.Group):
                    pending.append(item)
                elif item.is_virtual or item.external:
                    raise refuse(f"{item.name} keeps its data outside the file")
        return len(handle.attrs["layer_names"])


def keras_mobilenet_v2(weights_file: Path) -> Any:
    """Keras Applications' MobileNetV2 (alpha 1.0, no top) with the file's weights, or one line saying why not."""
    import tensorflow as tf

    check_weights_file(weights_file)
    model = tf.keras.applications.MobileNetV2(input_shape=KERAS_INPUT_SHAPE, alpha=1.0, include_top=False, weights=None)
    try:
        model.load_weights(str(weights_file))
    except (ValueError, OSError, KeyError) as err:
        first = " ".join(str(err).split())[:300]
        raise PipelineError(
            f"{weights_file}: does not fit Keras Applications' MobileNetV2 (alpha 1.0, no top): {first}; "
            "download.pretrained: mobilenet_v2_imagenet needs mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
        ) from None
    return model


def by_role(variables: list[Any]) -> dict[str, list[Any]]:
    """Variables grouped by role, each group in creation order (the forward order for these networks)."""
    groups: dict[str, list[Any]] = {role: [] for role in ROLES}
    for variable in variables:
        role = variable.name.rsplit("/", 1)[-1].split(":")[0]
        if role not in groups:
            raise PipelineError(f"unexpected variable {variable.name} in a MobileNetV2 backbone (no rule to copy it)")
        groups[role].append(variable)
    return groups


def copy_into_backbone(weights_file: Path, backbone: Any) -> int:
    """Assign the file's weights to a built tf-models MobileNetV2 ``backbone``; return how many variables.

    Every backbone variable is assigned (none keeps its random value), each from the
    variable of the same role and position in the Keras model, with the same shape.
    """
    source = by_role(keras_mobilenet_v2(weights_file).weights)
    target = by_role(backbone.weights)
    for role in ROLES:
        if len(source[role]) != len(target[role]):
            raise PipelineError(
                f"{weights_file}: {len(source[role])} {role} variables, the {backbone.name} backbone has "
                f"{len(target[role])}: train.architecture must be a MobileNetV2 (mobilenet_v2, mobilenet_v2_i320)"
            )
        for ours, theirs in zip(target[role], source[role], strict=True):
            if ours.shape != theirs.shape:
                raise PipelineError(
                    f"{weights_file}: {theirs.name} has shape {theirs.shape.as_list()}, the backbone's {ours.name} "
                    f"{ours.shape.as_list()}: not the alpha-1.0 MobileNetV2 this backbone is"
                )
            ours.assign(theirs)
    return sum(len(variables) for variables in target.values())
