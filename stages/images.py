"""images: put exactly the images the filtered set needs into the image store.

Reads data/filtered/labels.json and the ``download:`` params (this stage is the second
half of downloading: mirror, route, hosts, workers). Writes
    data/images/        one file per image (persist: an incremental store, pruned to the set)
    data/images.json    the store's index (persist, it travels with the store): usable images
                        with the URL each came from and its sha256, rejected ones with the reason
    reports/images.json counts (DVC metrics)

``download.images: per_image`` fetches each image from its ``coco_url`` (through the
mirror) in parallel; ``zips`` downloads COCO's train2017/val2017 zips as the Colab
walk-through did and extracts only the needed files. The user's own datasets are hard-linked
(copied across file systems). What the store trusts, and what it fetches again, is in
trafficdet/store.py.
"""

from __future__ import annotations

from collections import Counter

from trafficdet.errors import PipelineError, run_stage
from trafficdet.fetch import rewrite_mirror
from trafficdet.io import read_json, remove_stale_temps, write_json
from trafficdet.params import DownloadParams, load
from trafficdet.paths import DOWNLOADS, FILTERED_LABELS, IMAGE_INDEX, IMAGE_STORE, IMAGES_REPORT
from trafficdet.store import Outcome, Sources, clean_store, fetch_from_zips, fetch_per_image, prune_store, read_index


def materialize(params: DownloadParams) -> dict[str, Outcome]:
    """Every filtered image's outcome, by the route the params choose."""
    sources = Sources.from_params(params, read_index(IMAGE_INDEX))
    images = read_json(FILTERED_LABELS)["images"]
    if params.images == "zips" and params.source == "coco2017":
        zips = {
            "train2017": (rewrite_mirror(params.train_zip_url, params.mirror), params.train_zip_checksum),
            "val2017": (rewrite_mirror(params.val_zip_url, params.mirror), params.val_zip_checksum),
        }
        return fetch_from_zips(images, IMAGE_STORE, zips, sources, DOWNLOADS)
    return fetch_per_image(images, IMAGE_STORE, sources, params.image_workers)


def main() -> None:
    params = load(DownloadParams)
    remove_stale_temps(IMAGE_INDEX, IMAGES_REPORT)
    clean_store(IMAGE_STORE)
    results = materialize(params)
    kept = sorted(name for name, outcome in results.items() if not outcome.reason)
    rejected = {name: outcome.reason for name, outcome in sorted(results.items()) if outcome.reason}
    ignored = sum(outcome.ignored_local_path for outcome in results.values())
    pruned = prune_store(IMAGE_STORE, set(kept))
    files = {name: vars(results[name].record) for name in kept}
    write_json(IMAGE_INDEX, {"kept": kept, "rejected": rejected, "files": files}, indent=True)
    # Counts that depend only on the inputs: what was reused or fetched this time is printed, not recorded.
    write_json(IMAGES_REPORT, {"images": len(kept), "rejected": len(rejected), "local_path_ignored": ignored}, indent=True)
    for name, reason in list(rejected.items())[:10]:
        print(f"images: rejected {name!r}: {reason}")
    actions = Counter(outcome.action for outcome in results.values() if not outcome.reason)
    done = ", ".join(f"{count} {action}" for action, count in sorted(actions.items()))
    print(f"images: {len(kept)} usable ({done}), {len(rejected)} rejected, {pruned} stale files pruned")
    if ignored:
        print(
            f"images: ignored local_path in {ignored} downloaded records (honoured only for download.source: coco_folder | voc)"
        )
    if not kept:
        raise PipelineError(f"no usable images (see {IMAGE_INDEX})")


if __name__ == "__main__":
    run_stage(main)
