"""Experiment record: one training step on one device vs on 2 logical CPU replicas, same weights, same batch.

Backs the figures in tests/test_distribute.py (MAX_REPLICA_GAP) and trafficdet/modelmaker.py
(create_model). Needs a repository whose train stage has run (default .demo/repo), for its
data/cache and models/train/init. Each mode runs in its own process (logical CPU devices must
be set before TensorFlow starts): builds the model through trafficdet.modelmaker, loads the
init checkpoint, takes the first training batch without augmentation, runs one Keras step with
plain SGD, and saves the weight update; then the two updates are compared overall and per
variable. Not a benchmark: no timing.
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


def one_step(mode: str, out: Path, batch_size: int) -> None:
    """Run in the repository folder: save ``{variable: update}`` of one step in ``mode`` to ``out``."""
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
    from trafficdet import modelmaker as mm

    summary = json.loads(Path("models/train/train.json").read_text())
    init = Path("models/train/init").resolve()
    hparams = {"batch_size": batch_size, "epochs": 1, "shuffle": False, "distribution_strategy": "off", "num_gpus": 0}
    scratch = Path(tempfile.mkdtemp(prefix="replica_step."))  # Model Maker's export dir: nothing is written
    detector = mm.build_detector(summary["architecture"], init, summary["labels"], hparams, summary["l2_weight_decay"], scratch)
    mm.set_strategy(detector, strategy)
    preprocess = mm.preprocessor(detector)
    dataset = mm.load_dataset("train").gen_tf_dataset(
        batch_size, is_training=False, preprocess=lambda d, is_training: preprocess(d, False)
    )
    x, y = next(iter(dataset))
    y = {key: value for key, value in y.items() if key != "groundtruths"}
    with strategy.scope():
        mm.create_model(detector, None, strategy.num_replicas_in_sync)
        model = mm.keras_model(detector)
        model.compile(optimizer=tf.keras.optimizers.SGD(0.01))
        (index,) = init.glob("*.index")
        model.load_checkpoint(str(index.with_suffix("")), include_last_layer=True)
    before = {v.name: v.numpy().copy() for v in model.trainable_variables}
    model.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, verbose=0)
    np.savez(out, **{v.name.replace("/", "|"): v.numpy() - before[v.name] for v in model.trainable_variables})


def compare(one: Path, mirrored: Path) -> None:
    a, b = np.load(one), np.load(mirrored)
    names = sorted(a.files)
    dot = sum(float(np.sum(a[n].astype(np.float64) * b[n])) for n in names)
    norm_a = np.sqrt(sum(float(np.sum(a[n].astype(np.float64) ** 2)) for n in names))
    norm_b = np.sqrt(sum(float(np.sum(b[n].astype(np.float64) ** 2)) for n in names))
    diff = np.sqrt(sum(float(np.sum((a[n].astype(np.float64) - b[n]) ** 2)) for n in names))
    ratio, cosine = norm_b / norm_a, dot / norm_a / norm_b
    print(f"update: 2 replicas / one device {ratio:.4f}, cosine {cosine:.5f}, relative difference {diff / norm_a:.4f}")
    rows = sorted(
        ((np.linalg.norm(a[n] - b[n]) / np.linalg.norm(a[n]), n) for n in names if np.linalg.norm(a[n]) > 1e-6), reverse=True
    )
    print("relative difference per variable, largest and smallest:")
    for relative, name in rows[:5] + rows[-5:]:
        print(f"  {relative:.4f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT / ".demo/repo")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mode", choices=["one", "mirrored"], help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        one_step(args.mode, args.out, args.batch_size)
        return
    outs = {mode: ROOT / f"bench/out/replica_step_{mode}.npz" for mode in ("one", "mirrored")}
    outs["one"].parent.mkdir(exist_ok=True)
    for mode, out in outs.items():
        command = [sys.executable, __file__, "--mode", mode, "--out", str(out), "--batch-size", str(args.batch_size)]
        subprocess.run(command, cwd=args.repo, check=True)
    compare(outs["one"], outs["mirrored"])


if __name__ == "__main__":
    main()
