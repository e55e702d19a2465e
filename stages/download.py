"""download: raw annotations, the cocoTraffic relabel overlay and the pretrained checkpoint.

Outputs (each a folder with a ``manifest.json`` of what was fetched and its sha256):
    data/raw/annotations/   instances_train2017.json + instances_val2017.json (or instances_own.json)
    data/raw/relabel/       cocoTraffic's instances_*Traffic.json, or only a manifest when disabled
    models/pretrained/      <start point>/ files: a Model Maker COCO checkpoint (unpacked) or
                            Keras Applications' ImageNet MobileNetV2 weights (.h5); only a
                            manifest for scratch
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from trafficdet.architectures import IMAGENET, SCRATCH, START_POINTS
from trafficdet.archive import extract_tar, extract_zip
from trafficdet.errors import PipelineError, run_stage
from trafficdet.fetch import RetryPolicy, fetch, file_digest, rewrite_mirror
from trafficdet.imagenet import check_weights_file
from trafficdet.io import atomic_dir, remove_stale_temps, write_json
from trafficdet.params import DownloadParams, load
from trafficdet.paths import DOWNLOADS, PRETRAINED, RAW_ANNOTATIONS, RAW_RELABEL
from trafficdet.sources import import_coco_folder, import_voc_folder

COCO_INSTANCE_FILES = ("instances_train2017.json", "instances_val2017.json")
CHECKPOINT_HINT = (
    "Model Maker's checkpoint bucket has answered 403 AccessDenied since early 2026: set download.checkpoint_url "
    f"to a copy you host, or use the default that downloads, download.pretrained: {IMAGENET} "
    f"(with train.architecture: mobilenet_v2), or download.pretrained: {SCRATCH}"
)
IMAGENET_HINT = f"set download.checkpoint_url to a copy of the file you host, or download.pretrained: {SCRATCH}"


def _source_record(url: str, path: Path) -> dict[str, Any]:
    return {"url": url, "file": path.name, "bytes": path.stat().st_size, "sha256": file_digest(path)}


def download_annotations(url: str, checksum: str, policy: RetryPolicy, out: Path = RAW_ANNOTATIONS) -> None:
    """Fetch COCO's annotations zip and keep only the two instances files."""
    archive = fetch(url, DOWNLOADS / Path(url).name, checksum=checksum, policy=policy)

    def keep_instances(name: str) -> str | None:
        base = Path(name).name
        return base if base in COCO_INSTANCE_FILES else None

    with atomic_dir(out) as tmp:
        found = extract_zip(archive, tmp / "files", keep_instances)
        missing = sorted(set(COCO_INSTANCE_FILES) - set(found))
        if missing:
            raise PipelineError(f"{archive}: archive lacks {', '.join(missing)}")
        for name in found:
            (tmp / "files" / name).rename(tmp / name)
        (tmp / "files").rmdir()
        write_json(tmp / "manifest.json", {"source": "coco2017", "downloads": [_source_record(url, archive)]}, indent=True)


def import_own_dataset(source: str, root: Path, out: Path = RAW_ANNOTATIONS) -> None:
    """Read a local COCO or VOC folder into ``instances_own.json``."""
    data = import_coco_folder(root) if source == "coco_folder" else import_voc_folder(root)
    with atomic_dir(out) as tmp:
        write_json(tmp / "instances_own.json", data)
        write_json(tmp / "manifest.json", {"source": source, "path": str(root)}, indent=True)


def download_relabel(url: str, checksum: str, policy: RetryPolicy, out: Path = RAW_RELABEL) -> None:
    """Fetch the cocoTraffic annotation zip and keep its JSON files (flattened)."""
    with atomic_dir(out) as tmp:
        if not url:
            write_json(tmp / "manifest.json", {"enabled": False}, indent=True)
            return
        archive = fetch(url, DOWNLOADS / "02_coco_traffic.zip", checksum=checksum, policy=policy)

        def json_only(name: str) -> str | None:
            base = Path(name).name
            return base if base.endswith(".json") and not base.startswith(".") else None

        found = extract_zip(archive, tmp / "files", json_only)
        if not found:
            raise PipelineError(f"{archive}: no .json annotation files in the relabel archive")
        for name in found:
            (tmp / "files" / name).rename(tmp / name)
        (tmp / "files").rmdir()
        write_json(
            tmp / "manifest.json",
            {"enabled": True, "files": sorted(found), "downloads": [_source_record(url, archive)]},
            indent=True,
        )


def download_checkpoint(pretrained: str, url: str, checksum: str, policy: RetryPolicy, out: Path = PRETRAINED) -> None:
    """Fetch the start point into ``out/<pretrained>/``: a Model Maker checkpoint or Keras' ImageNet weights.

    Model Maker unpacks its checkpoint tarball by copying its single root folder; we keep
    that folder's contents so the train stage can hand it to Model Maker unchanged. The
    Keras weights file is kept as it is; the train stage builds the init checkpoint from it.
    """
    with atomic_dir(out) as tmp:
        if pretrained == SCRATCH:
            write_json(tmp / "manifest.json", {"pretrained": SCRATCH}, indent=True)
            return
        point = START_POINTS[pretrained]
        url = url or point.url
        hint = IMAGENET_HINT if point.kind == "keras_imagenet" else CHECKPOINT_HINT
        download = fetch(url, DOWNLOADS / Path(url).name, checksum=checksum, policy=policy, hint=hint)
        record = {"pretrained": pretrained, "folder": pretrained, "downloads": [_source_record(url, download)]}
        if point.kind == "keras_imagenet":
            check_weights_file(download)
            (tmp / pretrained).mkdir()
            shutil.copyfile(download, tmp / pretrained / download.name)
            record["file"] = f"{pretrained}/{download.name}"
        else:
            extract_tar(download, tmp / "unpacked")
            roots = list((tmp / "unpacked").iterdir())
            if len(roots) != 1 or not roots[0].is_dir():
                raise PipelineError(f"{download}: expected a single root folder, found {sorted(p.name for p in roots)}")
            roots[0].rename(tmp / pretrained)
            shutil.rmtree(tmp / "unpacked")
        write_json(tmp / "manifest.json", record, indent=True)


def main() -> None:
    params = load(DownloadParams)
    remove_stale_temps(RAW_ANNOTATIONS, RAW_RELABEL, PRETRAINED)
    policy = RetryPolicy.from_params(params)
    if params.source == "coco2017":
        download_annotations(rewrite_mirror(params.annotations_url, params.mirror), params.annotations_checksum, policy)
        download_relabel(params.relabel_url, params.relabel_checksum, policy)
    else:
        import_own_dataset(params.source, Path(params.source_path))
        download_relabel("", "", policy)  # the overlay relabels COCO 2017 annotation ids only
    download_checkpoint(params.pretrained, params.checkpoint_url, params.checkpoint_checksum, policy)


if __name__ == "__main__":
    run_stage(main)
