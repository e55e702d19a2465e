"""What the train stage trains on (``train.device``), said in one line, and no silent CPU fallback.

TF 2.15's plain wheel sees a GPU only with CUDA 12.2 and cuDNN 8.9 installed system-wide; its
``and-cuda`` extra brings them as nvidia-* wheels (requirements-gpu.lock). Without them, on a
machine whose ``nvidia-smi`` lists a GPU (Colab ships newer CUDA), TensorFlow trains on the
CPU, many times slower, without a word: this stops it, before any data is read, unless
``train.device: cpu`` says the CPU is meant. The device line is a fact about the machine, so
it is recorded with the machine's measurements (reports/timing/train/), not in models/.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
from typing import Any

from packaging.requirements import Requirement

from trafficdet.distribute import Distribution, strategy_devices
from trafficdet.errors import PipelineError
from trafficdet.params import TrainParams

CUDA_EXTRA = "and-cuda"
FIX = "run `make setup GPU=1` (installs requirements-gpu.lock, TensorFlow with its CUDA wheels)"
TO_CPU = "or set params.yaml train.device: cpu to train on the CPU"


def listed_gpus() -> list[str]:
    """The names of the GPUs ``nvidia-smi -L`` lists; none where it is missing or fails (no driver)."""
    found = shutil.which("nvidia-smi")
    if found is None:
        return []
    try:
        result = subprocess.run([found, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if result.returncode:
        return []
    # "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-...)"; MIG slices are indented lines below their GPU.
    return [m.group(1) for m in re.finditer(r"^GPU \d+: (.+?)(?: \(UUID: [^)]*\))?\s*$", result.stdout, re.MULTILINE)]


def extra_requirements(distribution: str = "tensorflow", extra: str = CUDA_EXTRA) -> list[Requirement]:
    """What the installed ``distribution`` requires with ``extra`` only, as its own metadata states it."""
    found = []
    for line in importlib.metadata.requires(distribution) or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is not None and marker.evaluate({"extra": extra}) and not marker.evaluate({"extra": ""}):
            found.append(requirement)
    return found


def missing_cuda_wheels() -> list[str]:
    """The nvidia-* wheels of ``tensorflow[and-cuda]`` that are not installed at the pinned version."""
    missing = []
    for requirement in extra_requirements():
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or installed not in requirement.specifier:
            missing.append(str(requirement))
    return missing


def why_no_gpu() -> str:
    """The likeliest reason TensorFlow sees no GPU where ``nvidia-smi`` lists one, and what to do."""
    import tensorflow as tf

    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [part.strip() for part in (hidden or "").split(",")]
    if hidden is not None and not any(name.isdigit() or name.startswith(("GPU", "MIG")) for name in names):
        return f"CUDA_VISIBLE_DEVICES={hidden!r} hides them: unset it, {TO_CPU}"
    if not tf.test.is_built_with_cuda():
        return f"this TensorFlow build has no CUDA support: {FIX}, {TO_CPU}"
    missing = missing_cuda_wheels()
    if missing:
        return (
            f"the CUDA 12.2 and cuDNN 8.9 libraries TensorFlow {tf.__version__} needs are not installed "
            f"({len(missing)} of tensorflow[{CUDA_EXTRA}]'s nvidia-* wheels missing: this is the CPU set, requirements.lock): "
            f"{FIX}, {TO_CPU}"
        )
    return (
        f"its CUDA wheels are installed but CUDA did not start: the NVIDIA driver may be older than CUDA 12.2 needs "
        f"(525 or newer; nvidia-smi shows it). `TF_CPP_MIN_LOG_LEVEL=0 python -c 'import tensorflow as tf; "
        f"tf.config.list_physical_devices()'` prints why; {TO_CPU}"
    )


def use_device(params: TrainParams) -> None:
    """Make TensorFlow's GPUs what ``train.device`` asks; call right after importing it, before any op.

    ``auto`` trains on the GPU TensorFlow sees, on the CPU where the machine has none, and stops
    where ``nvidia-smi`` lists a GPU that TensorFlow cannot use; ``gpu`` demands one; ``cpu``
    hides the GPUs from TensorFlow.
    """
    import tensorflow as tf

    seen = tf.config.list_physical_devices("GPU")
    if params.device == "cpu":
        if seen:
            tf.config.set_visible_devices([], "GPU")
        return
    if seen:
        return
    listed = listed_gpus()
    if listed:
        names = ", ".join(dict.fromkeys(listed))
        raise PipelineError(
            f"train: nvidia-smi lists {len(listed)} GPU{'s' if len(listed) > 1 else ''} ({names}) "
            f"but TensorFlow sees none, so training would run on the CPU: {why_no_gpu()}"
        )
    if params.device == "gpu":
        raise PipelineError(
            "params.yaml train.device: gpu, but this machine has no GPU (nvidia-smi lists none, TensorFlow sees none): "
            "run on a machine with one, or set train.device: auto"
        )


def device_line(strategy: Any, params: TrainParams, plan: Distribution) -> str:
    """``1 GPU (NVIDIA A100-SXM4-40GB), bfloat16, global batch 64`` or ``CPU only, 2 cores, float32, global batch 8``."""
    import tensorflow as tf

    visible = tf.config.get_visible_devices("GPU")
    devices = strategy_devices(strategy) or (["GPU:0"] if visible else ["CPU:0"])  # the default strategy: GPU:0 if any
    used = [int(d.rsplit(":", 1)[1]) for d in devices if "GPU:" in d.upper()]
    if used:
        names = [tf.config.experimental.get_device_details(visible[i]).get("device_name", f"GPU:{i}") for i in used]
        count = f"{len(used)} GPU{'s' if len(used) > 1 else ''}"
        if len(used) < len(visible):
            count = f"{len(used)} of {len(visible)} GPUs"
        where = f"{count} ({', '.join(dict.fromkeys(names))})"
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        where = f"CPU only, {cores} cores" + (f", {len(devices)} replicas" if len(devices) > 1 else "")
    parts = [where, "float32" if params.mixed_precision == "off" else params.mixed_precision]
    if params.jit_compile:
        parts.append("XLA")
    parts.append(f"global batch {params.batch_size}")
    if plan.workers > 1:
        parts.append(f"{plan.task} of {plan.workers} workers")
    return ", ".join(parts)
