"""TFLite size, AP and app latency per export.quantization, from one trained model.

Needs a repository whose train and evaluate stages have run (default: the demo's,
.demo/repo, after `make demo`). Exports every export.quantization with this checkout's
stages.export, each in a fresh process in a temporary view of that repository (its data and
models/train linked, its own models/ folder: the repository's outputs stay as they are).
Then, in this process, for each file: COCO AP on the whole validation set and median
per-frame latency of the app's detection (trafficdet/app.py: letterbox + MediaPipe Tasks)
over --runs passes of --images validation frames, interleaved so drift hits every variant
alike. The Keras AP beside them is the repository's evaluate stage's.
Target: int8 >= 1.4x faster than float32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

import yaml
from common import OUT, machine, median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.evaluate import coco_evaluate, tflite_detections  # noqa: E402
from trafficdet.app import AppDetector, read_frame  # noqa: E402
from trafficdet.params import ExportParams  # noqa: E402

KINDS = typing.get_args(ExportParams.model_fields["quantization"].annotation)  # every value params.yaml accepts
LARGE_CLASSES = ("car", "bus", "truck")


def export_view(repo: Path, tmp: Path, kind: str) -> Path:
    """Export ``kind`` from ``repo``'s trained model in a view of it under ``tmp``; return the TFLite file."""
    view = tmp / kind
    (view / "models").mkdir(parents=True)
    for name in ("stages", "trafficdet"):  # this checkout's code
        (view / name).symlink_to(ROOT / name)
    (view / "data").symlink_to((repo / "data").resolve())
    (view / "models/train").symlink_to((repo / "models/train").resolve())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["export"].update(quantization=kind, latency_images=1, latency_repeats=1)
    (view / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "stages.export"], cwd=view, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"export {kind} failed:\n{result.stderr[-3000:]}")
    return view / "models/model.tflite"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT / ".demo/repo")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, help="default: every kind the trained model allows")
    args = parser.parse_args()
    repo = args.repo.resolve()
    if not (repo / "reports/evaluate/coco.json").exists():
        sys.exit(f"{repo}: no trained and evaluated model (run `make demo` first, or pass --repo)")
    if args.kinds is None:  # qat_int8 needs a model trained with train.qat.enabled (bench_quantization.py)
        with_qat = bool(json.loads((repo / "models/train/train.json").read_text()).get("qat"))
        args.kinds = [kind for kind in KINDS if kind != "qat_int8" or with_qat]
    OUT.mkdir(exist_ok=True)
    ground_truth = json.loads((repo / "data/split/val/labels.json").read_text())
    images = repo / "data/images"
    keras = json.loads((repo / "reports/evaluate/coco.json").read_text())["keras"]

    variants: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_tflite.") as tmp:
        models = {}
        for kind in args.kinds:
            started = time.perf_counter()
            models[kind] = export_view(repo, Path(tmp), kind)
            print(f"exported {kind} in {time.perf_counter() - started:.0f} s", flush=True)
            result = coco_evaluate(ground_truth, tflite_detections(models[kind], ground_truth, images, 100), "faster_coco_eval")
            variants[kind] = {
                "size_mb": round(models[kind].stat().st_size / 2**20, 2),
                "AP": round(result["overall"]["AP"], 4),
                "AP50": round(result["overall"]["AP50"], 4),
                **{f"AP50_{name}": round(result["per_class"][name]["AP50"], 4) for name in LARGE_CLASSES},
                "per_class": {name: {k: round(v, 4) for k, v in values.items()} for name, values in result["per_class"].items()},
            }

        frames = [
            read_frame(images / image["file_name"]) for image in sorted(ground_truth["images"], key=lambda i: i["file_name"])
        ]
        frames = frames[: args.images]
        detectors = {kind: AppDetector(path, max_results=100, score_threshold=0.0) for kind, path in models.items()}
        times: dict[str, list[float]] = {kind: [] for kind in models}
        for detector in detectors.values():
            detector.detect(frames[0])  # warm-up
        for _ in range(args.runs):
            for kind, detector in detectors.items():
                for frame in frames:
                    start = time.perf_counter()
                    detector.detect(frame)
                    times[kind].append((time.perf_counter() - start) * 1000)
        for detector in detectors.values():
            detector.close()

    baseline = median(times["float32"]) if "float32" in times else None
    for kind, values in variants.items():
        values["latency_ms"] = round(median(times[kind]), 2)
        if baseline:
            values["speedup_vs_float32"] = round(baseline / median(times[kind]), 2)
    result = {
        "machine": machine(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # timings are only comparable on a quiet machine
        "repo": str(repo),
        "architecture": json.loads((repo / "models/train/train.json").read_text())["architecture"],
        "val_images": len(ground_truth["images"]),
        "latency_images": len(frames),
        "runs": args.runs,
        "keras": {
            "AP": keras["AP"],
            "AP50": keras["AP50"],
            **{f"AP50_{name}": keras["per_class"][name]["AP50"] for name in LARGE_CLASSES},
            "per_class": keras["per_class"],
        },
        "variants": variants,
    }
    (OUT / "tflite.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'':10s} {'MB':>6s} {'AP':>6s} {'AP50':>6s} " + " ".join(f"{n:>6s}" for n in LARGE_CLASSES) + f" {'ms':>7s}")
    rows = {"keras": result["keras"], **variants}
    for kind, values in rows.items():
        large = " ".join(f"{values[f'AP50_{n}']:6.3f}" for n in LARGE_CLASSES)
        size = f"{values['size_mb']:6.2f}" if "size_mb" in values else f"{'':6s}"
        latency = f"{values['latency_ms']:7.2f}" if "latency_ms" in values else ""
        print(f"{kind:10s} {size} {values['AP']:6.3f} {values['AP50']:6.3f} {large} {latency}")
    print(f"written to {OUT / 'tflite.json'}")


if __name__ == "__main__":
    main()
