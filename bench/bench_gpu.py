"""GPU check (make gpu-check): train steps of the detector by precision and XLA, on the GPU and on the CPU.

On a machine whose ``nvidia-smi`` lists a GPU: for float32, float16 and bfloat16 (Keras mixed
precision), each without and with XLA (``jit_compile``), a fresh process builds the train stage's
model the way the stage does (``trafficdet.modelmaker.training.create_model`` under
``precision_policy``, Model Maker's optimizer, scratch weights) on a synthetic COCO-sized cache
(synth.py, the cache stage's writer) and runs ``--steps`` real train steps (Keras ``fit``) on one batch replayed, after
``--warmup`` steps that trace and compile: the device's rate, not the input pipeline's
(bench_input.py measures that). Then one ``fit`` fed by the stage's own input pipeline
(``training_dataset``, float32): what this machine's cores let the GPU do. Then the same on the CPU
(GPUs hidden; float16 skipped, the stage refuses it without a GPU) with ``--cpu-batch`` and
``--cpu-steps`` (CPU steps are far slower, bfloat16 ones slower still: docs/speed.md).

Where nvidia-smi lists no GPU: one line saying so, exit 0. Where it lists one that TensorFlow
cannot use: the train stage's one-line cause and fix, exit 1. ``--cpu-only`` runs the CPU half
anyway (to try the script on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import OUT, machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trafficdet.device import listed_gpus  # noqa: E402

PRECISIONS = ("off", "float16", "bfloat16")  # train.mixed_precision: off is float32

CHILD = """
import json, os, sys, time
from pathlib import Path
from trafficdet import modelmaker as mm
from trafficdet.device import use_device
from trafficdet.errors import PipelineError
from trafficdet.params import TrainParams, load
mm.quiet_tensorflow()
import tensorflow as tf
from mediapipe_model_maker.python.vision.object_detector import dataset_util
from mediapipe_model_maker.python.vision.object_detector.dataset import Dataset
from mediapipe_model_maker.python.vision.object_detector.preprocessor import Preprocessor

folder, cache, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
batch, steps, warmup = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
precision, xla, device, architecture, pipeline = sys.argv[7], sys.argv[8] == "1", sys.argv[9], sys.argv[10], sys.argv[11] == "1"
try:
    use_device(load(TrainParams).model_copy(update={"device": device}))  # as the stage: gpu demands one, cpu hides them
except PipelineError as err:
    sys.exit(f"error: {err}")
tf.keras.utils.set_random_seed(42)
data = Dataset.from_cache(dataset_util.get_cache_files_coco(str(folder), str(cache)))
spec = mm.model_spec(architecture, work / "init")
preprocessor = Preprocessor(spec)
mm.write_scratch_checkpoint(spec, len(data.label_names), 3e-5, work / "init")
hparams = {"epochs": 1, "batch_size": batch, "learning_rate": 0.3}
detector = mm.build_detector(architecture, work / "init", data.label_names, hparams, 3e-5, work)
with mm.precision_policy(precision):  # as mm.create_and_train: optimizer and model under the policy
    detector._optimizer = detector._create_optimizer(max(len(data) // batch, 1))
    mm.create_model(detector, None, 1, precision, xla)
    model = mm.keras_model(detector)
    model.compile(optimizer=detector._optimizer)  # Model Maker's _train_model call; float16 adds loss scaling

class StepClock(tf.keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = [time.perf_counter()]
    def on_train_batch_end(self, index, logs=None):
        self.times.append(time.perf_counter())
    def rate(self):  # images/s over the steps after the warm-up (tracing, XLA compiling)
        return batch * (len(self.times) - 1 - warmup) / (self.times[-1] - self.times[warmup])

clock = StepClock()
one_batch = next(iter(mm.training_dataset(data, preprocessor, batch, True)))
model.fit(tf.data.Dataset.from_tensors(one_batch).repeat(warmup + steps), callbacks=[clock], verbose=0)
result = {"step": clock.rate(), "first_steps_s": clock.times[warmup] - clock.times[0]}
if pipeline:
    model.fit(mm.training_dataset(data, preprocessor, batch, True, drop_remainder=True).repeat().take(warmup + steps),
              callbacks=[clock], verbose=0)
    result["fed_by_input_pipeline"] = clock.rate()
gpus = tf.config.get_visible_devices("GPU")
result["device"] = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else "CPU"
print(json.dumps(result))
"""


def measure(args: argparse.Namespace, folder: Path, cache: Path, precision: str, xla: bool, device: str) -> dict:
    """One fresh process: a model for ``precision``/``xla`` trained on ``device``; its rates, or why it failed."""
    batch, steps, warmup = (args.batch, args.steps, args.warmup) if device == "gpu" else (args.cpu_batch, args.cpu_steps, 2)
    pipeline = device == "gpu" and precision == "off" and not xla
    work = OUT / f"gpu-work-{device}-{precision}-{int(xla)}"
    command = [sys.executable, "-c", CHILD, str(folder), str(cache), str(work), str(batch), str(steps)]
    command += [str(warmup), precision, str(int(xla)), device, args.architecture, str(int(pipeline))]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return {"failed": lines[-1] if lines else f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="synthetic 640x480 images in the cache")
    parser.add_argument("--batch", type=int, default=32, help="batch of the GPU runs")
    parser.add_argument("--steps", type=int, default=300, help="timed train steps per GPU run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first GPU steps (tracing, XLA compiling); 2 on the CPU")
    parser.add_argument("--cpu-batch", type=int, default=8, help="batch of the CPU runs (the train stage's default)")
    parser.add_argument("--cpu-steps", type=int, default=5, help="timed train steps per CPU run")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="train.mixed_precision values to run (off is float32)")
    parser.add_argument("--architecture", default="mobilenet_v2", help="train.architecture")
    parser.add_argument("--cpu-only", action="store_true", help="measure the CPU half even without a GPU")
    args = parser.parse_args()
    if set(args.precisions.split(",")) - set(PRECISIONS):
        parser.error(f"--precisions: choose from {','.join(PRECISIONS)}")

    gpus = listed_gpus()
    if not gpus and not args.cpu_only:
        print("gpu-check: no GPU here (nvidia-smi lists none): nothing to measure; run make gpu-check on a machine with one")
        return
    OUT.mkdir(exist_ok=True)
    folder = OUT / f"synth-{args.images}"
    if not (folder / "labels.json").exists():
        from synth import coco_folder

        coco_folder(folder, args.images)
    cache = OUT / f"synth-{args.images}-cache"
    if not cache.exists():
        from bench_input import CACHE_CHILD

        subprocess.run([sys.executable, "-c", CACHE_CHILD, str(folder), str(cache)], check=True, cwd=ROOT, capture_output=True)

    devices = (["gpu"] if gpus else []) + ["cpu"]
    table: dict[str, dict[str, dict]] = {device: {} for device in devices}
    for device in devices:
        for precision in args.precisions.split(","):
            for xla in (False, True):
                name = ("float32" if precision == "off" else precision) + (" + XLA" if xla else "")
                if device == "cpu" and precision == "float16":
                    table[device][name] = {"skipped": "float16 needs a GPU (the train stage refuses it on the CPU)"}
                    continue
                table[device][name] = measure(args, folder, cache, precision, xla, device)
                print(f"{device} {name}: {table[device][name]}", flush=True)
                if table[device][name].get("failed", "").startswith("error: "):
                    sys.exit(table[device][name]["failed"])  # e.g. TensorFlow cannot use the GPU: the stage's line says why
    result = {"machine": machine(), "gpus": gpus, "cores": len(os.sched_getaffinity(0)), "args": vars(args), "rates": table}
    (OUT / "gpu.json").write_text(json.dumps(result, indent=2))

    def cell(entry: dict, key: str = "step") -> str:
        return f"{entry[key]:.1f}" if key in entry else ("n/a" if "skipped" in entry else "failed")

    names = list(table["cpu"])
    batches = f"batch {args.batch} on the GPU, {args.cpu_batch} on the CPU" if gpus else f"batch {args.cpu_batch}"
    print(f"\n{machine()}; GPU: {', '.join(gpus) or 'none'}; {batches}; {args.architecture}; train images/s")
    print("| device | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for device in devices:
        print(f"| {device} | " + " | ".join(cell(table[device][name]) for name in names) + " |")
    if gpus:
        both = [n for n in names if "step" in table["gpu"][n] and "step" in table["cpu"][n]]
        ratios = [f"{table['gpu'][n]['step'] / table['cpu'][n]['step']:.1f}x" if n in both else "" for n in names]
        print("| GPU / CPU | " + " | ".join(ratios) + " |")
        fed = table["gpu"]["float32"].get("fed_by_input_pipeline")
        if fed:
            print(f"float32 on the GPU fed by the stage's input pipeline ({result['cores']} cores): {fed:.1f} images/s")
    failed = {f"{d} {n}": e["failed"] for d in devices for n, e in table[d].items() if "failed" in e}
    for name, line in failed.items():
        print(f"{name} failed: {line}")


if __name__ == "__main__":
    main()
