"""export: the trained model as the TFLite file the app loads, with metadata and labels.

Reads models/train (and data/cache/train for int8's representative set, data/split/val/labels.json
and data/images/ for the latency run); writes
    models/model.tflite    TFLite with MediaPipe metadata (labels, norms); the Keras model's own
                           detection step (per-class NMS) inside (trafficdet/tflite_model.py)
    models/metadata.json   what the model is (architecture, labels, quantization, input size, its
                           detection step: score floor, NMS), what the app must feed it ("input":
                           trafficdet/app.py's contract) and the TFLite metadata as JSON
    models/labels.txt      one class name per line, in the model's output order (no background)
    reports/export.json    the file's size in MB (a DVC metric: a `dvc exp show` column)
    reports/timing/export.json  median CPU latency of the app's detection, letterbox + MediaPipe
                           Tasks (a DVC metric too, but a measurement of this machine)
"""

from __future__ import annotations

import io
import json
import statistics
import struct
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from trafficdet.app import INPUT_CONTRACT, AppDetector, read_frame
from trafficdet.architectures import ARCHITECTURES
from trafficdet.errors import PipelineError, run_stage
from trafficdet.io import read_json, remove_stale_temps, write_bytes, write_json
from trafficdet.modelmaker.build import restore_detector
from trafficdet.modelmaker.cache import load_dataset, quiet_tensorflow
from trafficdet.modelmaker.qat import restore_qat_detector
from trafficdet.params import ExportParams, load
from trafficdet.paths import EXPORT_REPORT, EXPORT_TIMING, IMAGE_STORE, MODEL, MODEL_LABELS, MODEL_METADATA, TRAINED, split_labels
from trafficdet.tflite_model import convert, detection_settings, with_metadata


def shorten_lists(value: Any, limit: int = 100) -> Any:
    """The TFLite metadata lists every SSD anchor (thousands): keep a count instead."""
    if isinstance(value, dict):
        return {key: shorten_lists(item, limit) for key, item in value.items()}
    if isinstance(value, list):
        return f"<{len(value)} entries>" if len(value) > limit else [shorten_lists(item, limit) for item in value]
    return value


def quantization_config(kind: str, representative_steps: int):
    """Model Maker's quantization config for ``kind`` (None: float32). qat_int8 takes uint8 frames, as
    Model Maker's own QAT export, and needs no representative set (the QAT model carries its ranges);
    post-training int8 ends with float input (trafficdet.tflite_model.calibrated_int8)."""
    import tensorflow as tf
    from mediapipe_model_maker.python.core.utils import quantization

    if kind == "qat_int8":
        return quantization.QuantizationConfig(inference_input_type=tf.uint8)
    if kind == "float16":
        return quantization.QuantizationConfig.for_float16()
    if kind == "dynamic":
        return quantization.QuantizationConfig.for_dynamic()
    if kind == "int8":  # representative set: the training images, as the model will see them
        return quantization.QuantizationConfig.for_int8(load_dataset("train"), quantization_steps=representative_steps)
    return None


DOS_EPOCH = struct.pack("<HH", 0, (1 << 5) | 1)  # 00:00:00 on 1980-01-01, as (time, date)


def pin_zip_times(model: bytes) -> bytes:
    """The model with the modification times of its packed files set to 1980-01-01.

    MediaPipe's metadata writer appends labels.txt as a zip member stamped with the time of
    the export, the only byte that differs between two exports of the same checkpoint. By
    hand because no library rewrites a zip in place: the four time/date bytes of each local
    header and central directory entry are overwritten, nothing moves, CRCs stay valid.
    """
    if not zipfile.is_zipfile(io.BytesIO(model)):
        return model  # nothing packed
    data = bytearray(model)
    with zipfile.ZipFile(io.BytesIO(model)) as zf:
        infos, position = zf.infolist(), zf.start_dir
    for info in infos:
        assert data[info.header_offset : info.header_offset + 4] == b"PK\x03\x04"
        data[info.header_offset + 10 : info.header_offset + 14] = DOS_EPOCH
        assert data[position : position + 4] == b"PK\x01\x02"
        data[position + 12 : position + 16] = DOS_EPOCH
        name, extra, comment = struct.unpack("<HHH", data[position + 28 : position + 34])
        position += 46 + name + extra + comment
    return bytes(data)


def measure_latency(model: Path, images: list[Path], repeats: int) -> dict[str, float]:
    """Median per-frame CPU latency of the app's detection (letterbox + MediaPipe Tasks) on ``images``."""
    frames = [read_frame(path) for path in images]
    with AppDetector(model, max_results=100, score_threshold=0.0) as detector:
        detector.detect(frames[0])  # warm-up
        times = []
        for _ in range(repeats):
            for frame in frames:
                start = time.perf_counter()
                detector.detect(frame)
                times.append((time.perf_counter() - start) * 1000)
    return {"latency_ms": round(statistics.median(times), 2)}  # over latency_images x latency_repeats runs


def export(params: ExportParams, out_model: Path = MODEL) -> dict[str, Any]:
    """Export ``models/model.tflite`` (+ metadata, labels); return the report."""
    kind = params.quantization
    summary = read_json(TRAINED / "train.json")
    if kind == "qat_int8" and not summary.get("qat"):
        raise PipelineError(
            f"params.yaml export.quantization: qat_int8 needs a model trained with QAT, and {TRAINED} has none: "
            "set train.qat.enabled: true (and rerun train), or export.quantization: int8 (post-training)"
        )
    quiet_tensorflow()
    out_model.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="export.") as tmp_dir:  # in data/.tmp/<pid>
        tmp = Path(tmp_dir)
        detector = restore_qat_detector(TRAINED, tmp) if kind == "qat_int8" else restore_detector(TRAINED, tmp)
        labels = summary["labels"][1:]  # the model's class outputs: background (id 0) is not one
        converted = convert(detector, quantization_config(kind, params.representative_steps))
        model, metadata_json = with_metadata(converted, detector, labels)
        (tmp / "model.tflite").write_bytes(model)
        tflite_metadata = shorten_lists(json.loads(metadata_json))
        names = sorted(image["file_name"] for image in read_json(split_labels("val"))["images"])
        images = [IMAGE_STORE / name for name in names[: params.latency_images]]
        latency = measure_latency(tmp / "model.tflite", images, params.latency_repeats)
        size = (tmp / "model.tflite").stat().st_size
        arch = ARCHITECTURES[summary["architecture"]]
        metadata = {
            "name": "traffic-detector",
            "architecture": summary["architecture"],
            "input_size": [arch.input_size, arch.input_size, 3],
            "input": INPUT_CONTRACT,  # what the app must do to a frame (trafficdet/app.py); expected AP: MODEL_CARD.md
            "quantization": kind,
            "labels": labels,  # the model's class output k is labels[k]
            "detection_step": detection_settings(detector),  # inside the file: no box below its score_threshold
            "trained_epochs": summary["epochs"],
            "qat_epochs": len(summary["qat"]["history"]) if summary.get("qat") else 0,
            "init": summary["init"],
            "start_point": summary.get("start_point", summary["init"]),
            "tflite_metadata": tflite_metadata,
        }
        write_bytes(out_model, pin_zip_times((tmp / "model.tflite").read_bytes()))
    write_json(MODEL_METADATA, metadata, indent=True)
    write_bytes(MODEL_LABELS, ("\n".join(labels) + "\n").encode())
    # One number per file, so one column each in `dvc exp show`: the quantization is a param, and
    # models/metadata.json says it too.
    report = {"size_mb": round(size / 2**20, 3)}
    write_json(EXPORT_REPORT, report, indent=True)
    write_json(EXPORT_TIMING, latency, indent=True)
    return {"quantization": kind, **report, **latency}


def main() -> None:
    params = load(ExportParams)
    remove_stale_temps(MODEL, MODEL_METADATA, MODEL_LABELS, EXPORT_REPORT, EXPORT_TIMING)
    report = export(params)
    print(f"export: {MODEL} ({report['quantization']}, {report['size_mb']} MB, {report['latency_ms']} ms/image on CPU)")


if __name__ == "__main__":
    run_stage(main)
