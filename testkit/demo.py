"""The offline demo (`make demo`): the whole pipeline on synthetic scenes served on loopback.

Runs in a throwaway copy of the repository under .demo/ (so your working tree and DVC
cache stay as they were). The copy's committed params point it offline: the synthetic
fixture via download.mirror, every image, and the default architecture (MobileNetV2, 256 px)
from a seeded scratch initialisation (the ImageNet start point cannot be downloaded). The
training knobs are a DVC experiment's `-S` overrides, so `make compare REPO_DIR=.demo/repo`
shows them as its changed params.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from testkit.fixture import download_params, generate, write_video
from testkit.fixture_server import FixtureServer
from testkit.repo_copy import ROOT, copy_repo

LARGE_CLASSES = ("car", "bus", "truck")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--dir", type=Path, default=ROOT / ".demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more -S overrides")
    args = parser.parse_args()
    started = time.perf_counter()
    shutil.rmtree(args.dir, ignore_errors=True)
    fixture, repo = args.dir / "fixture", args.dir / "repo"
    manifest = generate(fixture, images=args.images, seed=0)
    repo.mkdir(parents=True)
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    with FixtureServer(fixture) as server:
        offline = {
            "download": {**download_params(server.url, manifest), "pretrained": "scratch"},
            "filter": {"images_per_class": "all"},
            "train": {"init": "scratch"},
        }
        copy_repo(repo, offline)
        overrides = {"train.bn_momentum": 0.9, "train.epochs": args.epochs}
        flags = [f"-S{key}={value}" for key, value in overrides.items()] + [f"-S{item}" for item in args.set]
        print(f"demo: {args.images} synthetic scenes on {server.url}; dvc exp run in {repo}", flush=True)
        subprocess.run(["dvc", "exp", "run", *flags], cwd=repo, env=env, check=True)
    elapsed = time.perf_counter() - started
    metrics = json.loads((repo / "reports/evaluate/coco.json").read_text())  # every number, not only the headline
    subprocess.run(["dvc", "plots", "show", "-o", "dvc_plots"], cwd=repo, env=env, check=True, capture_output=True)
    export = json.loads((repo / "reports/export.json").read_text())
    export |= json.loads((repo / "reports/timing/export.json").read_text())
    print(f"\n{'metric':8s} {'keras':>7s} {'tflite':>7s}")
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"):
        print(f"{name:8s} {metrics['keras'][name]:7.3f} {metrics['tflite'][name]:7.3f}")
    model = json.loads((repo / "models/metadata.json").read_text())
    print(
        f"model: {model['architecture']} from {model.get('start_point', model['init'])}, {model['trained_epochs']} epochs; "
        f"{export['size_mb']} MB {model['quantization']}, {export['latency_ms']} ms/image (MediaPipe Tasks, CPU)"
    )
    keras, tflite = metrics["keras"], metrics["tflite"]
    print(f"\n{'class':20s} {'AP keras':>9s} {'tflite':>7s} {'AP50 keras':>11s} {'tflite':>7s}")
    for name, values in tflite["per_class"].items():
        theirs = keras["per_class"][name]
        print(f"{name:20s} {theirs['AP']:9.3f} {values['AP']:7.3f} {theirs['AP50']:11.3f} {values['AP50']:7.3f}")
    print(f"\ndemo finished in {elapsed / 60:.1f} min")
    print(
        f"TFLite as the app runs it (letterbox + MediaPipe Tasks, models/MODEL_CARD.md) on "
        f"{len(json.loads((repo / 'data/split/val/labels.json').read_text())['images'])} validation images: "
        f"AP {tflite['AP']:.3f} (Keras {keras['AP']:.3f}), AP50 {tflite['AP50']:.3f} (Keras {keras['AP50']:.3f})"
    )
    for name in LARGE_CLASSES:
        print(f"  AP50 {name:6s} {tflite['per_class'][name]['AP50']:.3f} (Keras {keras['per_class'][name]['AP50']:.3f})")
    print(f"model:   {repo / 'models/model.tflite'} (card: models/MODEL_CARD.md, metadata: models/metadata.json)")
    print(f"plots:   {repo / 'dvc_plots/index.html'} (loss curves, per-class AP, PR curves, predictions, confusion matrix)")
    print(f"compare: make compare REPO_DIR={repo.relative_to(ROOT) if repo.is_relative_to(ROOT) else repo}")
    # For `make predict`: the validation images in a folder of their own, and a clip of a synthetic street.
    val_images = args.dir / "val"
    val_images.mkdir()
    for image in json.loads((repo / "data/split/val/labels.json").read_text())["images"]:
        (val_images / image["file_name"]).symlink_to((repo / "data/images" / image["file_name"]).resolve())
    clip = write_video(args.dir / "street.mp4")
    shown = args.dir.relative_to(ROOT) if args.dir.is_relative_to(ROOT) else args.dir
    model = shown / "repo/models/model.tflite"
    print(f"predict: make predict SOURCE={shown / 'val'} MODEL={model} (or SOURCE={shown / clip.name})")
    summary = {
        "minutes": round(elapsed / 60, 2),
        "AP": tflite["AP"],
        "AP50": tflite["AP50"],
        **{f"AP50_{n}": tflite["per_class"][n]["AP50"] for n in LARGE_CLASSES},
        "keras": {
            "AP": keras["AP"],
            "AP50": keras["AP50"],
            **{f"AP50_{n}": keras["per_class"][n]["AP50"] for n in LARGE_CLASSES},
        },
        "per_class": {
            name: {"keras": keras["per_class"][name], "tflite": tflite["per_class"][name]} for name in tflite["per_class"]
        },
    }
    (args.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
