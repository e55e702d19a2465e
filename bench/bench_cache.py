"""The cache stage's writer: Model Maker's single-process writer vs ours (tf.data on every core), 1 and 2 cores.

A synthetic COCO-sized set (640x480 JPEGs of about COCO's mean file size, see synth.py) is
written by ``trafficdet.modelmaker.cache.write_coco_cache`` with ``parallel=False`` (Model Maker's
``COCOCacheFilesWriter``: the baseline) and ``parallel=True``, each run in a fresh process pinned
with ``taskset`` to 1 or 2 cores, the four kinds interleaved in every round. Every output must
have the same bytes. Target: ours >= 1.8x the baseline on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import OUT, machine, median, sized_args
from synth import coco_folder, mean_jpeg_kb

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import hashlib, json, sys, time
from pathlib import Path
from trafficdet.modelmaker.cache import quiet_tensorflow, write_coco_cache
quiet_tensorflow()
import tensorflow as tf
folder, out, parallel = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
tf.io.decode_jpeg(next((folder / "images").iterdir()).read_bytes())  # TensorFlow's runtime starts outside the timing
from mediapipe_model_maker.python.vision.object_detector import dataset_util  # and both writers' imports (1.4 s)
from official.vision.data import tfrecord_lib
started, cpu = time.perf_counter(), time.process_time()
_, size = write_coco_cache(folder, out, parallel=parallel)
seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(out.iterdir()))).hexdigest()
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "images": size, "sha256": digest}))
"""

KINDS = {  # name: (cores for taskset, parallel writer)
    "model_maker_1core": ("0", False),
    "ours_1core": ("0", True),
    "model_maker_2cores": ("0,1", False),
    "ours_2cores": ("0,1", True),
}


def run_kind(cores: str, parallel: bool, folder: Path, out: Path) -> dict:
    result = subprocess.run(
        ["taskset", "-c", cores, sys.executable, "-c", CHILD, str(folder), str(out), "1" if parallel else "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    args = sized_args(__doc__, images=2000)
    folder = OUT / f"synth-{args.images}"
    if not (folder / "labels.json").exists():  # reused across runs: generating takes longer than writing
        coco_folder(folder, args.images)
    timings: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for _ in range(args.runs):
        for kind, (cores, parallel) in KINDS.items():
            with tempfile.TemporaryDirectory() as tmp:
                timings[kind].append(run_kind(cores, parallel, folder, Path(tmp) / "cache"))
    digests = {run["sha256"] for runs in timings.values() for run in runs}
    assert len(digests) == 1, f"outputs differ: {digests}"
    seconds = {kind: median([run["seconds"] for run in runs]) for kind, runs in timings.items()}
    cpu = {kind: median([run["cpu_seconds"] for run in runs]) for kind, runs in timings.items()}
    baseline = seconds["model_maker_2cores"]
    result = {
        "machine": machine(),
        "images": args.images,
        "mean_jpeg_kb": round(mean_jpeg_kb(folder), 1),
        "runs": args.runs,
        "identical_bytes": True,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "ms_per_image": {kind: 1000 * value / args.images for kind, value in seconds.items()},
        "speedup_vs_model_maker_2cores": {kind: baseline / value for kind, value in seconds.items()},
        "load_average_after": os.getloadavg(),
    }
    (OUT / "cache.json").write_text(json.dumps(result, indent=2))
    print(f"{machine()}; {args.images} images of {result['mean_jpeg_kb']} KB, median of {args.runs} runs")
    print("| writer | cores | seconds | ms/image | CPU s | vs Model Maker on 2 cores |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, (cores, parallel) in KINDS.items():
        name = "ours (tf.data, every core)" if parallel else "Model Maker (one process)"
        print(
            f"| {name} | {len(cores.split(','))} | {seconds[kind]:.2f} | {result['ms_per_image'][kind]:.2f} "
            f"| {cpu[kind]:.2f} | {result['speedup_vs_model_maker_2cores'][kind]:.2f}x |"
        )
    print(f"identical bytes in all {args.runs * len(KINDS)} outputs (sha256 {digests.pop()[:16]}...)")


if __name__ == "__main__":
    main()
