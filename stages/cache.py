"""cache: Model Maker's TFRecord cache of each split, the only data the train stage reads.

Reads data/split/{train,val}/labels.json and data/images/; writes data/cache/{train,val}/ (TFRecord shards, Model
Maker's metadata YAML, and ``cache.json`` naming the prefix and shard count so that
training can call ``Dataset.from_cache`` without the images) and reports/cache.json.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from trafficdet.errors import PipelineError, run_stage
from trafficdet.io import atomic_dir, read_json, remove_stale_temps, write_json
from trafficdet.modelmaker.cache import model_maker_folder, quiet_tensorflow, write_coco_cache
from trafficdet.paths import CACHE_REPORT, IMAGE_STORE, SIDES, SPLIT, cache_dir, split_labels


def build_cache(split_dir: Path, cache_dir: Path, store: Path = IMAGE_STORE) -> dict[str, Any]:
    """Write the TFRecord cache of one split side; return its ``cache.json`` record."""
    quiet_tensorflow()
    labels = read_json(split_dir / "labels.json")
    # Training ignores the anchors over crowd regions (and unrelabelled lights under filter.unrelabelled_lights:
    # ignore); validation loss is Model Maker's, which cannot ignore: its cache holds the objects only.
    regions = split_dir.name == "train"
    with atomic_dir(cache_dir) as tmp, model_maker_folder(split_dir / "labels.json", store, ignore_regions=regions) as folder:
        files, size = write_coco_cache(folder, tmp)  # Model Maker's bytes, on every core
        if size != len(labels["images"]):
            raise PipelineError(
                f"{split_dir}: cached {size} of {len(labels['images'])} images "
                "(Model Maker skips images whose boxes all fall outside the image)"
            )
        record = {
            "split": split_dir.name,
            "cache_prefix_filename": files.cache_prefix_filename,
            "num_shards": files.num_shards,
            "size": size,
            "label_map": {str(k): v for k, v in sorted(files.load_metadata()["label_map"].items())},
            # Where the images come from (train2017, val2017, own): the train stage warns when a
            # COCO-trained checkpoint is validated on train2017 images it has seen.
            "origins": dict(sorted(Counter(str(image.get("origin")) for image in labels["images"]).items())),
        }
        write_json(tmp / "cache.json", record, indent=True)
    return record


def main() -> None:
    remove_stale_temps(*(cache_dir(side) for side in SIDES), CACHE_REPORT)
    for side in SIDES:
        if not split_labels(side).exists():
            raise PipelineError(f"{split_labels(side)}: missing; run the split stage first")
    report = {side: build_cache(SPLIT / side, cache_dir(side)) for side in SIDES}
    write_json(
        CACHE_REPORT,
        {side: {"images": record["size"], "shards": record["num_shards"]} for side, record in report.items()},
        indent=True,
    )
    print("cache: " + ", ".join(f"{side} {record['size']} images" for side, record in report.items()))


if __name__ == "__main__":
    run_stage(main)
