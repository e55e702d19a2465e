"""What bounds training: the input pipeline alone, the train step alone, and both, on 1 and 2 cores.

On a synthetic COCO-sized set (640x480 JPEGs, see synth.py) cached by the cache stage's writer,
each round starts one fresh process per core count, pinned with ``taskset`` (TensorFlow sizes its
thread pools from the cores it may use), seeded and with op determinism on as the train stage
does. In it:

- ``pipeline_model_maker``: Model Maker's training input, ``gen_tf_dataset(batch, is_training=True,
  shuffle=True, preprocess=preprocessor)``: read cache -> decode -> augment, resize, label anchors
  -> shuffle(3 x batch) -> batch -> prefetch, iterated without a model (the baseline);
- ``pipeline_ours``: ``trafficdet.modelmaker.training.training_dataset``, the same elements bit for bit;
- ``pipeline_ours_decoded_in_ram``: ours with the decoded images kept in memory (``cache()``),
  timed on passes after the first;
- ``step``: the train step alone, Model Maker's model, loss and optimizer on one batch replayed;
- ``validation_step``: the validation step (forward, loss, detection post-processing) likewise;
- ``train_model_maker`` / ``train_ours``: ``fit`` on each pipeline (steps after the first two).

Rates are images/s (median over passes within a process, then over rounds); CPU seconds per
image come from the process's CPU time while a pipeline runs alone, so they hold under load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import OUT, machine, median
from synth import coco_folder, mean_jpeg_kb

ROOT = Path(__file__).resolve().parents[1]
GPU_RATE = 500  # an assumed GPU training rate for this 256-px model (no GPU measured here)

CHILD = """
import json, statistics, sys, time
from pathlib import Path
from trafficdet import modelmaker as mm
mm.quiet_tensorflow()
import tensorflow as tf
from mediapipe_model_maker.python.vision.object_detector import dataset_util
from mediapipe_model_maker.python.vision.object_detector.dataset import Dataset
from mediapipe_model_maker.python.vision.object_detector.preprocessor import Preprocessor

folder, cache, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
batch, passes, steps, architecture = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
tf.keras.utils.set_random_seed(42)
tf.config.experimental.enable_op_determinism()  # as stages/train.py
data = Dataset.from_cache(dataset_util.get_cache_files_coco(str(folder), str(cache)))
spec = mm.model_spec(architecture, work / "init")
preprocessor = Preprocessor(spec)
result = {"cores": len(__import__("os").sched_getaffinity(0))}

def timed_passes(make, skip_first=False):
    rates, cpu = [], []
    for index in range(passes + skip_first):
        dataset = make()
        wall, used, images = time.perf_counter(), time.process_time(), 0
        for x, _ in dataset:
            images += int(x.shape[0])
        if index or not skip_first:
            rates.append(images / (time.perf_counter() - wall))
            cpu.append((time.process_time() - used) / images)
    return {"images_per_s": statistics.median(rates), "cpu_ms_per_image": 1000 * statistics.median(cpu)}

result["pipeline_model_maker"] = timed_passes(lambda: data.gen_tf_dataset(batch, True, True, preprocessor))
result["pipeline_ours"] = timed_passes(lambda: mm.training_dataset(data, preprocessor, batch, True))
in_ram = Dataset(data._dataset.cache(), data.label_names, size=len(data))
result["pipeline_ours_decoded_in_ram"] = timed_passes(lambda: mm.training_dataset(in_ram, preprocessor, batch, True), True)

mm.write_scratch_checkpoint(spec, len(data.label_names), 3e-5, work / "init")
hparams = {"epochs": 1, "batch_size": batch, "learning_rate": 0.3}
detector = mm.build_detector(architecture, work / "init", data.label_names, hparams, 3e-5, work)
detector._optimizer = detector._create_optimizer(len(data) // batch)
mm.create_model(detector, None)
model = mm.keras_model(detector)
model.compile(optimizer=detector._optimizer)

class StepClock(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, index, logs=None):
        self.times.append(time.perf_counter())
    def on_test_batch_end(self, index, logs=None):
        self.times.append(time.perf_counter())
    def on_train_begin(self, logs=None):
        self.times = []
    def on_test_begin(self, logs=None):
        self.times = []
    def rate(self):  # after the first two steps (tracing)
        return batch * (len(self.times) - 3) / (self.times[-1] - self.times[2])

clock = StepClock()
one_batch = next(iter(mm.training_dataset(data, preprocessor, batch, True)))
model.fit(tf.data.Dataset.from_tensors(one_batch).repeat(steps + 3), callbacks=[clock], verbose=0)
result["step"] = {"images_per_s": clock.rate()}
val_batch = next(iter(data.gen_tf_dataset(batch, False, False, preprocessor)))
model.evaluate(tf.data.Dataset.from_tensors(val_batch).repeat(steps + 3), callbacks=[clock], verbose=0)
result["validation_step"] = {"images_per_s": clock.rate()}
for name, make in (
    ("train_model_maker", lambda: data.gen_tf_dataset(batch, True, True, preprocessor)),
    ("train_ours", lambda: mm.training_dataset(data, preprocessor, batch, True)),
):
    model.fit(make().take(steps + 3), callbacks=[clock], verbose=0)
    result[name] = {"images_per_s": clock.rate()}
print(json.dumps(result))
"""

MEASURES = (
    "pipeline_model_maker",
    "pipeline_ours",
    "pipeline_ours_decoded_in_ram",
    "step",
    "validation_step",
    "train_model_maker",
    "train_ours",
)


def run_round(cores: str, folder: Path, cache: Path, args: argparse.Namespace) -> dict:
    work = OUT / f"input-work-{cores.replace(',', '')}"
    command = [sys.executable, "-c", CHILD, str(folder), str(cache), str(work), str(args.batch), str(args.passes)]
    result = subprocess.run(
        ["taskset", "-c", cores, *command, str(args.steps), args.architecture],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-5000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="synthetic 640x480 images in the cache")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--passes", type=int, default=3, help="pipeline passes per process")
    parser.add_argument("--steps", type=int, default=20, help="timed train steps per measure")
    parser.add_argument("--runs", type=int, default=3, help="rounds (fresh processes per core count)")
    parser.add_argument("--architecture", default="mobilenet_v2", help="train.architecture of the timed step")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    folder = OUT / f"synth-{args.images}"
    if not (folder / "labels.json").exists():
        coco_folder(folder, args.images)
    cache = OUT / f"synth-{args.images}-cache"
    if not cache.exists():
        subprocess.run([sys.executable, "-c", CACHE_CHILD, str(folder), str(cache)], check=True, cwd=ROOT, capture_output=True)
    rounds: dict[str, list[dict]] = {"1": [], "2": []}
    for _ in range(args.runs):
        for cores in ("0", "0,1"):
            rounds[str(len(cores.split(",")))].append(run_round(cores, folder, cache, args))
    table = {
        cores: {measure: {key: median([r[measure][key] for r in runs]) for key in runs[0][measure]} for measure in MEASURES}
        for cores, runs in rounds.items()
    }
    one, two = table["1"], table["2"]
    per_core = one["pipeline_ours"]["images_per_s"]
    efficiency = two["pipeline_ours"]["images_per_s"] / (2 * per_core)
    cpu_ms = median([one["pipeline_ours"]["cpu_ms_per_image"], two["pipeline_ours"]["cpu_ms_per_image"]])
    result = {
        "machine": machine(),
        "images": args.images,
        "mean_jpeg_kb": round(mean_jpeg_kb(folder), 1),
        "batch": args.batch,
        "architecture": args.architecture,
        "runs": args.runs,
        "by_cores": table,
        "bound_here": "train step" if two["step"]["images_per_s"] < two["pipeline_ours"]["images_per_s"] else "input",
        "ours_vs_model_maker_2cores": two["pipeline_ours"]["images_per_s"] / two["pipeline_model_maker"]["images_per_s"],
        "scaling_1_to_2_cores": 2 * efficiency,
        "cores_for_gpu_rate": {
            "from_1core_rate_and_2core_efficiency": GPU_RATE / (per_core * efficiency),
            "from_cpu_time_per_image": GPU_RATE * cpu_ms / 1000,
        },
        "load_average_after": os.getloadavg(),
    }
    (OUT / "input.json").write_text(json.dumps(result, indent=2))
    print(f"{machine()}; {args.images} images of {result['mean_jpeg_kb']} KB, batch {args.batch}, median of {args.runs} rounds")
    print("| images/s | 1 core | 2 cores | CPU ms/image (1 core) |")
    print("| --- | ---: | ---: | ---: |")
    for measure in MEASURES:
        cpu = one[measure].get("cpu_ms_per_image")
        cells = f"{one[measure]['images_per_s']:.1f} | {two[measure]['images_per_s']:.1f} | " + (f"{cpu:.2f}" if cpu else "")
        print(f"| {measure} | {cells} |")
    print(
        f"bound here by: {result['bound_here']}; ours vs Model Maker's pipeline on 2 cores: "
        f"{result['ours_vs_model_maker_2cores']:.2f}x; 1->2 cores: {result['scaling_1_to_2_cores']:.2f}x; "
        f"cores for {GPU_RATE} images/s: {result['cores_for_gpu_rate']['from_1core_rate_and_2core_efficiency']:.1f} "
        f"(rates), {result['cores_for_gpu_rate']['from_cpu_time_per_image']:.1f} (CPU time)"
    )


CACHE_CHILD = """
import sys
from pathlib import Path
from trafficdet.modelmaker.cache import quiet_tensorflow, write_coco_cache
quiet_tensorflow()
write_coco_cache(Path(sys.argv[1]), Path(sys.argv[2]))
"""

if __name__ == "__main__":
    main()
