"""Experiment record: one training step on one device vs on 2 logical CPU replicas, same weights, same batch.

Backs the figures in tests/test_distribute.py (the replica bounds) and
trafficdet/modelmaker/training.py (create_model). Needs a repository whose train stage has run (default .demo/repo), for its
data/cache and models/train/init. Each run is its own process (logical CPU devices must be set
before TensorFlow starts): builds the model through trafficdet.modelmaker, loads the init
checkpoint, takes the first training batch without augmentation, runs one Keras step (our
train_step) with plain SGD, and saves the weight update. Runs:

  one, float32              the reference as training computes it
  one, float32, permuted    the same batch with its halves swapped: the same arithmetic
                            problem, summed in another order
  mirrored, float32         2 replicas, as ``train.distribution_strategy: mirrored``
  one / mirrored, float64   the same in float64: the exact step, to ~1e-12

In float64 the model is built with Keras' float64 default and the float32 init values cast
(the checkpoint itself is float32), and tf-models' FocalLoss, which casts its inputs to
float32, runs in its inputs' dtype. Each update is compared with the float64 one-device step
(relative difference, length ratio, cosine). Not a benchmark: no timing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUNS = {  # name: (mode, dtype, permuted)
    "one float32": ("one", "float32", False),
    "one float32 permuted": ("one", "float32", True),
    "mirrored float32": ("mirrored", "float32", False),
    "one float64": ("one", "float64", False),
    "mirrored float64": ("mirrored", "float64", False),
}


def float64_focal_loss() -> None:
    """tf-models' FocalLoss.call in its inputs' dtype (it casts them to float32), for the float64 runs."""
    import tensorflow as tf
    from official.vision.losses import focal_loss

    def call(self, y_true, y_pred):
        y_true = tf.cast(y_true, y_pred.dtype)
        positive = tf.equal(y_true, 1.0)
        cross_entropy = tf.nn.sigmoid_cross_entropy_with_logits(labels=y_true, logits=y_pred)
        probs = tf.sigmoid(y_pred)
        loss = tf.pow(1.0 - tf.where(positive, probs, 1.0 - probs), self._gamma) * cross_entropy
        return tf.where(positive, self._alpha * loss, (1.0 - self._alpha) * loss)

    focal_loss.FocalLoss.call = call


def one_step(mode: str, dtype: str, permuted: bool, out: Path, batch_size: int) -> None:
    """Run in the repository folder: save ``{variable: update}`` of one step to ``out``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    import tensorflow as tf

    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(devices=[d.name for d in tf.config.list_logical_devices("CPU")])
    else:
        strategy = tf.distribute.get_strategy()
    tf.keras.utils.set_random_seed(42)
    tf.config.experimental.enable_op_determinism()
    from mediapipe_model_maker.python.vision.object_detector import model as model_lib

    from trafficdet import modelmaker as mm

    summary = json.loads(Path("models/train/train.json").read_text())
    init = Path("models/train/init").resolve()
    (index,) = init.glob("*.index")
    hparams = {"batch_size": batch_size, "epochs": 1, "shuffle": False, "distribution_strategy": "off", "num_gpus": 0}
    export_dir = Path(tempfile.mkdtemp(prefix="replica_step."))  # Model Maker's export dir: nothing is written
    detector = mm.build_detector(
        summary["architecture"], init, summary["labels"], hparams, summary["l2_weight_decay"], export_dir
    )
    mm.set_strategy(detector, strategy)
    preprocess = mm.preprocessor(detector)
    dataset = mm.load_dataset("train").gen_tf_dataset(
        batch_size, is_training=False, preprocess=lambda d, is_training: preprocess(d, False)
    )
    x, y = next(iter(dataset))
    y = {key: value for key, value in y.items() if key != "groundtruths"}
    if permuted:
        order = list(range(batch_size // 2, batch_size)) + list(range(batch_size // 2))
        x, y = tf.gather(x, order), tf.nest.map_structure(lambda t: tf.gather(t, order), y)
    checkpoint = str(index.with_suffix(""))
    if dtype == "float64":
        float64_focal_loss()
        mm.create_model(detector, None)  # float32: Model Maker restores the init checkpoint
        values = mm.keras_model(detector).get_weights()
        tf.keras.backend.set_floatx("float64")
        shape = [1, *mm.detector_spec(detector).input_image_shape]
        # A float32 checkpoint does not restore into float64 variables: build without it, set the values cast.
        model_lib.ObjectDetectorModel.load_checkpoint = lambda self, *a, **k: self._model(tf.zeros(shape, tf.float64))
        x, y = tf.nest.map_structure(lambda t: tf.cast(t, tf.float64) if t.dtype.is_floating else t, (x, y))
    with strategy.scope():
        mm.create_model(detector, None, strategy.num_replicas_in_sync)
        model = mm.keras_model(detector)
        model.compile(optimizer=tf.keras.optimizers.SGD(0.01))
        if dtype == "float64":
            model.set_weights([value.astype(np.float64) for value in values])
        else:
            model.load_checkpoint(checkpoint, include_last_layer=True)
    before = {v.name: v.numpy().copy() for v in model.trainable_variables}
    model.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, verbose=0)
    np.savez(out, **{v.name.replace("/", "|"): v.numpy() - before[v.name] for v in model.trainable_variables})


def compare(updates: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Each update against the float64 one-device step (and the float32 ones against each other).

    Variables are matched by position (the float64 runs build the model twice, so Keras numbers
    their layer names differently).
    """
    loaded = {name: np.load(path) for name, path in updates.items()}
    arrays = {name: [update[key].astype(np.float64) for key in update.files] for name, update in loaded.items()}
    for name, values in arrays.items():
        assert [v.shape for v in values] == [v.shape for v in arrays["one float64"]], name

    def norm(a: list[np.ndarray]) -> float:
        return float(np.sqrt(sum(float(np.sum(v**2)) for v in a)))

    def against(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, float]:
        diff = float(np.sqrt(sum(float(np.sum((p - q) ** 2)) for p, q in zip(a, b, strict=True))))
        dot = sum(float(np.sum(p * q)) for p, q in zip(a, b, strict=True))
        return {"relative_difference": diff / norm(b), "length_ratio": norm(a) / norm(b), "cosine": dot / norm(a) / norm(b)}

    truth = arrays["one float64"]
    rows = {f"{name} vs one float64": against(update, truth) for name, update in arrays.items() if name != "one float64"}
    rows["mirrored float32 vs one float32"] = against(arrays["mirrored float32"], arrays["one float32"])
    rows["one float32 permuted vs one float32"] = against(arrays["one float32 permuted"], arrays["one float32"])
    for name, row in rows.items():
        print(f"{name:40s} " + "  ".join(f"{k} {v:.3g}" for k, v in row.items()))
    names = [key.replace("|", "/") for key in loaded["one float32"].files]
    one32, head = arrays["one float32"], [i for i, key in enumerate(names) if key.startswith("retina_net_head")]
    rest = [i for i in range(len(names)) if i not in head]
    for part, index in (("head", head), ("backbone and decoder", rest)):
        error = against([one32[i] for i in index], [truth[i] for i in index])["relative_difference"]
        print(f"one float32 vs one float64, {part}: relative difference {error:.3g}")
        rows[f"one float32 vs one float64, {part}"] = {"relative_difference": error}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT / ".demo/repo")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--compare-only", action="store_true", help="compare the updates saved by an earlier run")
    parser.add_argument("--run", choices=list(RUNS), help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        one_step(*RUNS[args.run], args.out, args.batch_size)
        return
    out_dir = ROOT / "bench/out"
    out_dir.mkdir(exist_ok=True)
    updates = {name: out_dir / f"replica_step_{name.replace(' ', '_')}.npz" for name in RUNS}
    for name, out in updates.items():
        if args.compare_only:
            continue
        command = [sys.executable, __file__, "--run", name, "--out", str(out), "--batch-size", str(args.batch_size)]
        subprocess.run(command, cwd=args.repo, check=True)
    rows = compare(updates)
    (out_dir / "replica_step.json").write_text(
        json.dumps({"repo": str(args.repo), "batch_size": args.batch_size, **rows}, indent=2)
    )


if __name__ == "__main__":
    main()
