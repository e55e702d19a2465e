"""images: put exactly the images the filtered set needs into the image store.

Reads data/filtered/labels.json and the ``download:`` params (this stage is the second
half of downloading: mirror, route, workers). Writes
    data/images/        one file per image (persist: an incremental store, pruned to the set)
    data/images.json    which images are usable and which were rejected, with the reason
    reports/images.json counts (DVC metrics)

``download.images: per_image`` fetches each image from its ``coco_url`` (through the
mirror) in parallel; ``zips`` downloads COCO's train2017/val2017 zips as the reference
notebook did and extracts only the needed files. Local datasets are hard-linked (copied
across file systems). Every image is decoded once; corrupt or mis-sized files are rejected.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from trafficdet.errors import PipelineError, run_stage
from trafficdet.fetch import HTTPStatusError, RetryPolicy, fetch, rewrite_mirror
from trafficdet.io import read_json, remove_stale_temps, write_json
from trafficdet.params import DownloadParams, load
from trafficdet.paths import DOWNLOADS, FILTERED_LABELS, IMAGE_INDEX, IMAGE_STORE, IMAGES_REPORT


def verify_image(path: Path, width: int | None, height: int | None) -> str:
    """Decode the whole file once; return "" if usable, else why not."""
    try:
        with Image.open(path) as image:
            image.load()
            size, fmt = image.size, image.format
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        return f"corrupt image: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    if fmt != "JPEG":
        return f"{fmt} image: Model Maker's COCO reader decodes JPEG only"
    if width and height and size != (width, height):
        return f"size {size[0]}x{size[1]} differs from annotated {width}x{height}"
    return ""


def _place_local(source: Path, dest: Path) -> None:
    if not source.is_file():
        raise FileNotFoundError(source)
    try:
        os.link(source, dest)
    except OSError:  # another file system, or links not allowed: copy instead
        shutil.copyfile(source, dest)


def materialize_one(image: dict[str, Any], store: Path, mirror: str, policy: RetryPolicy) -> str:
    """Make ``store/file_name`` a verified copy of the image; return "" or the reject reason."""
    dest = store / image["file_name"]
    width, height = image.get("width"), image.get("height")
    if dest.exists():
        if not verify_image(dest, width, height):
            return ""
        dest.unlink()  # a bad leftover from an earlier run: fetch it again
    if "local_path" in image:
        try:
            _place_local(Path(image["local_path"]), dest)
        except FileNotFoundError:
            return f"missing local file {image['local_path']}"
    elif "coco_url" in image:
        try:
            fetch(rewrite_mirror(image["coco_url"], mirror), dest, policy=policy, progress=False)
        except HTTPStatusError as err:
            return f"HTTP {err.status}"
    else:
        return "no coco_url or local_path"
    reason = verify_image(dest, width, height)
    if reason:
        dest.unlink()
    return reason


def fetch_per_image(images: list[dict[str, Any]], store: Path, mirror: str, workers: int, policy: RetryPolicy) -> dict[str, str]:
    """Materialize every image with ``workers`` threads (each reusing its connections)."""
    store.mkdir(parents=True, exist_ok=True)
    results: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=len(images), unit="img", desc="images") as bar:
        futures = {pool.submit(materialize_one, image, store, mirror, policy): image["file_name"] for image in images}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update()
    return results


def fetch_from_zips(
    images: list[dict[str, Any]], store: Path, zips: list[tuple[str, str]], workers: int, policy: RetryPolicy
) -> dict[str, str]:
    """The reference route: download whole COCO zips, extract only the needed members."""
    store.mkdir(parents=True, exist_ok=True)
    wanted = {image["file_name"] for image in images if not (store / image["file_name"]).exists()}
    for url, checksum in zips:
        if not wanted:
            break
        archive = fetch(url, DOWNLOADS / Path(url).name, checksum=checksum, policy=policy)
        try:
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    name = Path(info.filename).name
                    if name in wanted:
                        with zf.open(info) as src, open(store / name, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
                        wanted.discard(name)
        except (zipfile.BadZipFile, EOFError) as err:
            raise PipelineError(f"{archive}: truncated or corrupt zip archive ({err}); delete it and download again") from None
    results = {name: "not found in the image zips" for name in wanted}
    remaining = [image for image in images if image["file_name"] not in wanted]
    # everything needed is now local: verification is the same path as per_image
    results.update(fetch_per_image(remaining, store, "", workers, policy))
    return results


def prune_store(store: Path, keep: set[str]) -> int:
    """Remove files no longer in the filtered set (the store persists across runs)."""
    removed = 0
    for path in store.iterdir():
        if path.name not in keep:
            path.unlink() if path.is_file() or path.is_symlink() else shutil.rmtree(path)
            removed += 1
    return removed


def main() -> None:
    params = load(DownloadParams)
    remove_stale_temps(IMAGE_INDEX, IMAGES_REPORT)
    policy = RetryPolicy.from_params(params)
    images = read_json(FILTERED_LABELS)["images"]
    if params.images == "zips" and all("coco_url" in image for image in images):
        zips = [
            (rewrite_mirror(params.train_zip_url, params.mirror), params.train_zip_checksum),
            (rewrite_mirror(params.val_zip_url, params.mirror), params.val_zip_checksum),
        ]
        results = fetch_from_zips(images, IMAGE_STORE, zips, params.image_workers, policy)
    else:
        results = fetch_per_image(images, IMAGE_STORE, params.mirror, params.image_workers, policy)
    kept = sorted(name for name, reason in results.items() if not reason)
    rejected = {name: reason for name, reason in sorted(results.items()) if reason}
    pruned = prune_store(IMAGE_STORE, set(kept))
    write_json(IMAGE_INDEX, {"kept": kept, "rejected": rejected}, indent=True)
    write_json(IMAGES_REPORT, {"images": len(kept), "rejected": len(rejected), "pruned": pruned}, indent=True)
    for name, reason in list(rejected.items())[:10]:
        print(f"images: rejected {name}: {reason}")
    print(f"images: {len(kept)} usable, {len(rejected)} rejected, {pruned} stale files pruned")
    if not kept:
        raise PipelineError(f"no usable images (see {IMAGE_INDEX})")


if __name__ == "__main__":
    run_stage(main)
