"""Every path the pipeline reads or writes, named once (relative to the repository root).

``dvc.yaml`` declares the same paths; ``tests/test_layout.py`` checks that each one it
names is defined here.
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
PIPELINE = Path("dvc.yaml")

# Not DVC outputs: `dvc repro` deletes outputs before a stage runs, and these must survive it.
DOWNLOADS = Path("data/.downloads")  # archives and partial downloads, so a killed download resumes
TEMP = Path("data/.tmp")  # per-process temp dirs (Model Maker's among them), removed at exit

# download
RAW_ANNOTATIONS = Path("data/raw/annotations")
RAW_RELABEL = Path("data/raw/relabel")
PRETRAINED = Path("models/pretrained")

# filter
FILTERED_LABELS = Path("data/filtered/labels.json")
LABEL_MAP = Path("data/filtered/label_map.json")
FILTER_REPORT = Path("reports/filter.json")

# images
IMAGE_STORE = Path("data/images")
IMAGE_INDEX = Path("data/images.json")
IMAGES_REPORT = Path("reports/images.json")

# split
SPLIT = Path("data/split")
SPLIT_REPORT = Path("reports/split.json")

# cache
CACHE = Path("data/cache")
CACHE_REPORT = Path("reports/cache.json")

# train
TRAINED = Path("models/train")
TRAIN_STATE = Path("models/train_state")
TRAIN_LIVE = Path("reports/train")

# export
MODEL = Path("models/model.tflite")
MODEL_METADATA = Path("models/metadata.json")
MODEL_LABELS = Path("models/labels.txt")
EXPORT_REPORT = Path("reports/export.json")

# evaluate
EVALUATE_LIVE = Path("reports/evaluate")  # dvclive: metrics.json (the headline), plots/
EVALUATE_DETAILS = EVALUATE_LIVE / "coco.json"  # every COCO number, per model and class
EVALUATE_DETECTIONS = EVALUATE_LIVE / "detections.json"  # the TFLite detections it scored (COCO results)
EVALUATE_CONFUSION = EVALUATE_LIVE / "confusion.json"  # the TFLite confusion matrix, as counts
EVALUATE_CONFUSION_PLOT = EVALUATE_LIVE / "plots/images/confusion_matrix.png"  # ... and as a picture
MODEL_CARD = Path("models/MODEL_CARD.md")  # the app's input contract and the expected AP

# Measurements of the machine that ran a stage (seconds, images/s, latency): the only outputs
# that are not a function of the declared inputs, kept apart so that every other output is.
TIMING = Path("reports/timing")
TRAIN_TIMING = TIMING / "train"  # dvclive: per-epoch seconds and images/s
EXPORT_TIMING = TIMING / "export.json"  # MediaPipe Tasks latency of the exported model

SIDES = ("train", "val")


def split_labels(side: str) -> Path:
    """``data/split/<side>/labels.json``: one side's COCO file (its images stay in the image store)."""
    return SPLIT / side / "labels.json"


def cache_dir(side: str) -> Path:
    """``data/cache/<side>``: Model Maker's TFRecords of one side and its ``cache.json``."""
    return CACHE / side
