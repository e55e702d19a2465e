"""QAT int8 vs post-training int8 vs float32 on the offline demo: AP through MediaPipe Tasks, file size.

Runs the demo (`testkit.demo`) with `train.qat.enabled: true` (unless `--repo` names a demo
repo that already trained with QAT), then exports each `export.quantization` (float32, int8,
qat_int8) of that one trained model with this checkout's export stage, in a temporary view
of the repo (as bench_tflite.py does), and scores each file on the validation set through
the app's detection. AP does not depend on machine load; the seconds printed do.
Results: bench/out/quantization.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_tflite import export_view
from common import OUT, machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.evaluate import coco_evaluate, tflite_detections  # noqa: E402

KINDS = ("float32", "int8", "qat_int8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=ROOT / ".demo-qat", help="where the demo runs")
    parser.add_argument("--repo", type=Path, help="a demo repo trained with QAT already (skips the demo)")
    parser.add_argument("--epochs", type=int, default=15, help="float epochs before QAT")
    parser.add_argument("--qat-epochs", type=int, default=15)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more demo overrides")
    args = parser.parse_args()
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    started = time.perf_counter()
    repo = args.repo
    if repo is None:
        sets = ["train.qat.enabled=true", f"train.qat.epochs={args.qat_epochs}", *args.set]
        command = [sys.executable, "-m", "testkit.demo", "--dir", str(args.dir), "--epochs", str(args.epochs)]
        command += [f"--set={item}" for item in sets]
        subprocess.run(command, cwd=ROOT, env=env, check=True)
        repo = args.dir / "repo"
    trained = json.loads((repo / "models/train/train.json").read_text())
    if not trained.get("qat"):
        sys.exit(f"{repo}: trained without QAT; run without --repo, or the demo with --set train.qat.enabled=true")
    results = {}
    ground_truth = json.loads((repo / "data/split/val/labels.json").read_text())
    with tempfile.TemporaryDirectory(prefix="bench_quantization.") as tmp:
        for kind in KINDS:
            model = export_view(repo, Path(tmp), kind)
            tflite = coco_evaluate(ground_truth, tflite_detections(model, ground_truth, repo / "data/images", 100))
            results[kind] = {
                "AP": round(tflite["overall"]["AP"], 4),
                "AP50": round(tflite["overall"]["AP50"], 4),
                "AP75": round(tflite["overall"]["AP75"], 4),
                "size_mb": round(model.stat().st_size / 2**20, 2),
                "per_class_AP50": {name: round(values["AP50"], 4) for name, values in tflite["per_class"].items()},
            }
    report = {
        "machine": machine(),
        "repo": str(repo),
        "float_epochs": trained["epochs"],
        "qat": {key: value for key, value in trained["qat"].items() if key != "history"},
        "qat_val_loss": [round(epoch["val_total_loss"], 3) for epoch in trained["qat"]["history"]],
        "float_val_loss": trained["final"].get("val_total_loss"),
        "results": results,
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'export':10s} {'AP':>6s} {'AP50':>6s} {'AP75':>6s} {'MB':>6s}")
    for kind, row in results.items():
        print(f"{kind:10s} {row['AP']:6.3f} {row['AP50']:6.3f} {row['AP75']:6.3f} {row['size_mb']:6.2f}")
    print(f"QAT validation loss by epoch: {report['qat_val_loss']} (float model: {report['float_val_loss']:.3f})")


if __name__ == "__main__":
    main()
