"""Experiment record: train on stretched squares (what Tasks does to a raw frame) instead of padding frames.

The alternative to the app's padding step (docs/app.md, option (c)), kept so it can be re-run;
its last figures predate the detection step inside the model and are no longer in BENCHMARKS.md.
In a copy of a trained demo repository (default .demo/repo, after `make demo`), it patches two
functions of that copy, not of this checkout:
Model Maker's preprocessor is fed every image stretched to the model's square (so its
letterbox pads nothing), and the Keras evaluation maps boxes back per axis. Then it
re-runs train, export and evaluate there and scores the TFLite with bench_app_input.py
(the "stretch" rows are this option's app path: raw frames into Tasks). One-off: the
patch matches the source text of trafficdet/modelmaker/build.py and stages/evaluate.py as of
this commit and stops if it does not. About 10 minutes on a quiet 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PREPROCESSOR = '''

def stretch_preprocessor(spec):
    """Model Maker's preprocessor, fed images stretched to the model's square first (experiment)."""
    import tensorflow as tf
    from mediapipe_model_maker.python.vision.object_detector import preprocessor as pp

    class Stretch(pp.Preprocessor):
        def __call__(self, data, is_training=True):
            data = dict(data)
            image = tf.image.resize(data["image"], self._output_size, method="bilinear")
            data["image"] = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
            return super().__call__(data, is_training)

    return Stretch(spec)
'''

PATCHES = {
    "trafficdet/modelmaker/build.py": [
        ("    return object_detector.ObjectDetector(\n", "    detector = object_detector.ObjectDetector(\n"),
        (
            "        model_options=model_options.ObjectDetectorModelOptions(l2_weight_decay=l2_weight_decay),\n    )\n\n\n"
            "def restore_detector",
            "        model_options=model_options.ObjectDetectorModelOptions(l2_weight_decay=l2_weight_decay),\n    )\n"
            "    detector._preprocessor = stretch_preprocessor(detector._model_spec)\n    return detector\n\n\n"
            "def restore_detector",
        ),
    ],
    "stages/evaluate.py": [
        (
            "        (height, width), (scale_y, scale_x) = info[b, 0], info[b, 2]"
            "  # rows: original size, square, scale, offset\n",
            "        (height, width), size = info[b, 0], info[b, 1]  # stretched: the model's square; map back per axis\n"
            "        scale_y, scale_x = size[0] / float(height), size[1] / float(width)\n",
        )
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT / ".demo/repo")
    parser.add_argument("--dir", type=Path, default=ROOT / ".demo/stretch")
    args = parser.parse_args()
    if not (args.repo / "models/train/train.json").exists():
        sys.exit(f"{args.repo}: no trained model (run `make demo` first, or pass --repo)")
    shutil.rmtree(args.dir, ignore_errors=True)
    shutil.copytree(args.repo, args.dir, symlinks=True)
    for name, replacements in PATCHES.items():
        if not (args.dir / name).is_file():
            sys.exit(f"{args.repo}: no {name} (made before this checkout's layout?); run `make demo` again")
        text = (args.dir / name).read_text()
        for old, new in replacements:
            if text.count(old) != 1:
                sys.exit(f"{name}: the text this experiment patches has changed; update PATCHES")
            text = text.replace(old, new)
        if name == "trafficdet/modelmaker/build.py":
            text += PREPROCESSOR
        (args.dir / name).write_text(text)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    for stage in ("train", "export", "evaluate"):
        subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=args.dir, env=env, check=True)
    out = ROOT / "bench/out/app_input_stretch_trained.json"
    score = [sys.executable, str(ROOT / "bench/bench_app_input.py"), "--repo", str(args.dir), "--out", str(out)]
    subprocess.run(score, check=True)


if __name__ == "__main__":
    main()
