"""images: parallel per-image fetch through the mirror, zips route, local datasets, corrupt files."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from stages import images
from testkit.fixture import image_records
from testkit.fixture_server import FixtureServer
from tests.conftest import write_params
from trafficdet.fetch import RetryPolicy
from trafficdet.io import read_json

FAST = RetryPolicy(retries=1, backoff_s=0.01, timeout_s=10)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def test_per_image_fetch_rejects_the_corrupt_jpeg(fixture_tree, server: FixtureServer, tmp_path: Path) -> None:
    root, _ = fixture_tree
    wanted = image_records(root)
    results = images.fetch_per_image(wanted, tmp_path / "store", server.url, 8, FAST)
    rejected = {name: reason for name, reason in results.items() if reason}
    assert list(rejected) == [wanted[0]["file_name"]]  # the fixture truncates its first image
    assert rejected[wanted[0]["file_name"]].startswith("corrupt image")
    assert not (tmp_path / "store" / wanted[0]["file_name"]).exists()
    assert len(list((tmp_path / "store").iterdir())) == len(wanted) - 1
    assert sum(server.hits.values()) == len(wanted)

    again = images.fetch_per_image(wanted, tmp_path / "store", server.url, 8, FAST)
    assert again == results and sum(server.hits.values()) == len(wanted) + 1  # only the bad one is retried


def test_missing_image_is_rejected_not_fatal(fixture_tree, server: FixtureServer, tmp_path: Path) -> None:
    root, _ = fixture_tree
    wanted = image_records(root)[1:4]
    server.inject(wanted[1]["coco_url"].split("cocodataset.org")[1], "status:404")
    results = images.fetch_per_image(wanted, tmp_path / "store", server.url, 2, FAST)
    assert results[wanted[1]["file_name"]] == "HTTP 404"
    assert sum(1 for reason in results.values() if not reason) == 2


def test_size_mismatch_and_non_jpeg_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    Image.new("RGB", (20, 10)).save(path, format="JPEG")
    assert images.verify_image(path, 20, 10) == ""
    assert images.verify_image(path, 30, 10) == "size 20x10 differs from annotated 30x10"
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    assert "JPEG only" in images.verify_image(path, 20, 10)


def test_zips_route_extracts_only_needed_files(fixture_tree, server: FixtureServer, tmp_path: Path) -> None:
    root, manifest = fixture_tree
    wanted = image_records(root)[1:6]
    zips = [(f"{server.url}/zips/{side}2017.zip", manifest["checksums"][f"zips/{side}2017.zip"]) for side in ("train", "val")]
    results = images.fetch_from_zips(wanted, tmp_path / "store", zips, 2, FAST)
    assert results == {image["file_name"]: "" for image in wanted}
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted(results)


def test_local_images_are_linked_and_store_is_pruned(tmp_path: Path) -> None:
    source = tmp_path / "own"
    source.mkdir()
    Image.new("RGB", (8, 8)).save(source / "a.jpg", format="JPEG")
    store = tmp_path / "store"
    store.mkdir()
    (store / "stale.jpg").write_bytes(b"old")
    wanted = [
        {"file_name": "a.jpg", "width": 8, "height": 8, "local_path": str(source / "a.jpg")},
        {"file_name": "b.jpg", "width": 8, "height": 8, "local_path": str(source / "b.jpg")},
    ]
    results = images.fetch_per_image(wanted, store, "", 2, FAST)
    assert results == {"a.jpg": "", "b.jpg": f"missing local file {source / 'b.jpg'}"}
    assert (store / "a.jpg").stat().st_ino == (source / "a.jpg").stat().st_ino  # a hard link, no copy
    assert images.prune_store(store, {"a.jpg"}) == 1 and not (store / "stale.jpg").exists()


def test_index_lists_kept_and_rejected(fixture_tree, server: FixtureServer, tmp_path: Path, monkeypatch) -> None:
    root, _ = fixture_tree
    labels = tmp_path / "data/filtered/labels.json"
    labels.parent.mkdir(parents=True)
    import orjson

    labels.write_bytes(orjson.dumps({"images": image_records(root)[:3]}))
    write_params(Path("params.yaml"), download={"image_workers": 2, "mirror": server.url, "retries": 1, "backoff_s": 0.01})
    images.main()
    index = read_json(Path("data/images.json"))
    assert len(index["kept"]) == 2 and len(index["rejected"]) == 1
