"""TFLite size and MediaPipe Tasks CPU latency per export.quantization, from one trained model.

Needs a repository whose train stage has run (default: the demo's, .demo/repo, after
`make demo`). Exports float32 / float16 / int8 / dynamic with stages.export in fresh
processes, then times each file in this process: median per-image latency over --runs
passes of --images validation images, interleaved so drift hits every variant alike.
Target (issue 3): int8 >= 1.4x faster than float32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import OUT, machine, median

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("float32", "float16", "int8", "dynamic")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT / ".demo/repo")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not (args.repo / "models/train/train.json").exists():
        sys.exit(f"{args.repo}: no trained model (run `make demo` first, or pass --repo)")
    OUT.mkdir(exist_ok=True)
    models = {}
    for kind in KINDS:
        code = (
            "import sys, yaml; sys.path.insert(0, '.'); from stages.export import export; "
            "p = yaml.safe_load(open('params.yaml'))['export']; "
            f"p.update(quantization='{kind}', latency_images=1, latency_repeats=1); export(p)"
        )
        subprocess.run([sys.executable, "-c", code], cwd=args.repo, check=True, capture_output=True)
        models[kind] = OUT / f"model_{kind}.tflite"
        shutil.copy(args.repo / "models/model.tflite", models[kind])

    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions
    from mediapipe.tasks.python.vision import ObjectDetector, ObjectDetectorOptions

    images = [mp.Image.create_from_file(str(p)) for p in sorted((args.repo / "data/split/val/images").iterdir())[: args.images]]
    detectors = {
        kind: ObjectDetector.create_from_options(
            ObjectDetectorOptions(base_options=BaseOptions(model_asset_path=str(path)), max_results=100, score_threshold=0.0)
        )
        for kind, path in models.items()
    }
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for detector in detectors.values():
        detector.detect(images[0])  # warm-up
    for _ in range(args.runs):
        for kind, detector in detectors.items():
            for image in images:
                start = time.perf_counter()
                detector.detect(image)
                times[kind].append((time.perf_counter() - start) * 1000)
    baseline = median(times["float32"])
    result = {
        "machine": machine(),
        "architecture": json.loads((args.repo / "models/train/train.json").read_text())["architecture"],
        "images": len(images),
        "runs": args.runs,
        "variants": {
            kind: {
                "size_mb": round(models[kind].stat().st_size / 2**20, 2),
                "latency_ms": round(median(times[kind]), 2),
                "speedup_vs_float32": round(baseline / median(times[kind]), 2),
            }
            for kind in KINDS
        },
    }
    (OUT / "tflite.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
