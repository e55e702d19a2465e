"""What the train stage starts from, resolved once per run from params.yaml and models/pretrained.

``train.init: scratch`` is a seeded random initialisation; ``pretrained`` is what the download
stage fetched (its manifest names it), which must fit ``train.architecture``. The manifest's hash
belongs to the resume state's owner (trafficdet/resume.py): another download is another run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trafficdet.architectures import IMAGENET, SCRATCH, START_POINTS
from trafficdet.errors import PipelineError
from trafficdet.io import read_json
from trafficdet.params import TrainParams
from trafficdet.paths import PRETRAINED

MANIFEST = PRETRAINED / "manifest.json"


@dataclass(frozen=True)
class Start:
    """The start point: its name, where its weights are, and the hash of the manifest it was read from."""

    name: str  # SCRATCH, IMAGENET or a Model Maker COCO checkpoint (a START_POINTS key)
    manifest_sha256: str | None  # of models/pretrained/manifest.json (None if absent), also for scratch
    weights: Path | None = None  # the ImageNet weights file, or the COCO checkpoint's folder; None for scratch

    @property
    def coco_trained(self) -> bool:
        """A Model Maker checkpoint, trained on COCO train2017 (the ImageNet backbone and scratch saw none of it)."""
        return self.name not in (SCRATCH, IMAGENET)


def resolve_start(params: TrainParams) -> Start:
    """``scratch`` or the download stage's start point, which must fit the architecture; read once per run."""
    digest = hashlib.sha256(MANIFEST.read_bytes()).hexdigest() if MANIFEST.is_file() else None
    if params.init == SCRATCH:
        return Start(SCRATCH, digest)
    manifest = read_json(MANIFEST)
    fetched = manifest.get("pretrained")
    point = START_POINTS.get(fetched)
    if point is None or params.architecture not in point.fits:
        fitting = " or ".join(name for name, p in START_POINTS.items() if params.architecture in p.fits)
        fits = f" (it fits {' and '.join(point.fits)})" if point else ""
        raise PipelineError(
            f"params.yaml train.init: pretrained {params.architecture!r}, but the download stage fetched {fetched!r}"
            f"{fits}: set download.pretrained: {fitting}, or train.init: scratch"
        )
    if fetched != IMAGENET:
        return Start(fetched, digest, PRETRAINED / fetched)
    weights = manifest.get("file")  # the download stage records it; needed only when the model is built
    return Start(fetched, digest, PRETRAINED / weights if weights else None)


def leakage_warning(params: TrainParams, start: Start, val_record: dict[str, Any]) -> str | None:
    """One line when a COCO-trained start point is validated on COCO train2017 images it was trained on.

    Model Maker's checkpoints were trained on COCO train2017 (the ImageNet backbone and scratch
    saw none of it); the cache stage records where the validation images come from.
    """
    seen = val_record.get("origins", {}).get("train2017", 0)
    if not start.coco_trained or not seen:
        return None
    return (
        f"train: warning: {seen} of {val_record['size']} validation images are from COCO train2017, which the pretrained "
        f"{params.architecture} checkpoint was trained on: validation loss and AP are optimistic and not comparable "
        "with published COCO figures (split.method: coco validates on val2017 only)"
    )
