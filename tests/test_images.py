"""images: parallel per-image fetch through the mirror, zips route, local datasets, corrupt files,
and a store that trusts a file only by its recorded URL and sha256."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import orjson
import pytest
from PIL import Image

from stages import images
from testkit.fixture import image_records
from testkit.fixture_server import FixtureServer
from tests.conftest import fixture_overrides, make_repo, run, write_params
from trafficdet import store as store_module
from trafficdet.errors import PipelineError
from trafficdet.fetch import RetryPolicy, file_digest
from trafficdet.io import read_json
from trafficdet.store import Record, Sources, fetch_from_zips, fetch_per_image, prune_store, verify_image

FAST = RetryPolicy(retries=1, backoff_s=0.01, timeout_s=10)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def reasons(results: dict) -> dict[str, str]:
    return {name: outcome.reason for name, outcome in results.items()}


def records(results: dict) -> dict[str, Record]:
    return {name: outcome.record for name, outcome in results.items() if not outcome.reason}


def test_per_image_fetch_rejects_the_corrupt_jpeg(fixture_tree, server: FixtureServer, tmp_path: Path) -> None:
    root, _ = fixture_tree
    wanted = image_records(root)
    results = fetch_per_image(wanted, tmp_path / "store", Sources.for_mirror(server.url, FAST), 8)
    rejected = {name: reason for name, reason in reasons(results).items() if reason}
    assert list(rejected) == [wanted[0]["file_name"]]  # the fixture truncates its first image
    # Named by its URL and the reason, never by the store's temp file.
    assert rejected[wanted[0]["file_name"]].startswith(f"{server.url}/train2017/{wanted[0]['file_name']}: corrupt image: ")
    assert ".new" not in rejected[wanted[0]["file_name"]] and str(tmp_path) not in rejected[wanted[0]["file_name"]]
    assert not (tmp_path / "store" / wanted[0]["file_name"]).exists()
    assert len(list((tmp_path / "store").iterdir())) == len(wanted) - 1
    assert sum(server.hits.values()) == len(wanted)
    name = wanted[1]["file_name"]
    assert results[name].record == Record(f"{server.url}/train2017/{name}", file_digest(tmp_path / "store" / name))

    again = fetch_per_image(wanted, tmp_path / "store", Sources.for_mirror(server.url, FAST, previous=records(results)), 8)
    assert reasons(again) == reasons(results) and records(again) == records(results)
    assert sum(server.hits.values()) == len(wanted) + 1  # only the bad one is retried
    assert {outcome.action for outcome in again.values()} == {"reused", "rejected"}


def test_missing_image_is_rejected_not_fatal(fixture_tree, server: FixtureServer, tmp_path: Path) -> None:
    root, _ = fixture_tree
    wanted = image_records(root)[1:4]
    server.inject(wanted[1]["coco_url"].split("cocodataset.org")[1], "status:404")
    results = fetch_per_image(wanted, tmp_path / "store", Sources.for_mirror(server.url, FAST), 2)
    path = wanted[1]["coco_url"].split("cocodataset.org")[1]
    assert results[wanted[1]["file_name"]].reason == f"{server.url}{path}: HTTP 404 Not Found"  # the server says: no file
    assert sum(1 for outcome in results.values() if not outcome.reason) == 2


@pytest.mark.parametrize(
    ("faults", "reason"),
    [
        (["empty"], "empty response (0 bytes)"),
        (["html"], "a text/html page, not an image"),
        (["status:503"], "HTTP 503 Service Unavailable"),
        (["status:403"], "HTTP 403 Forbidden"),
    ],
)
def test_a_bad_answer_that_may_be_a_bad_moment_stops_the_fetch(
    fixture_tree, server: FixtureServer, tmp_path: Path, faults: list[str], reason: str
) -> None:
    """Retried (but a 403: access is not the file's), then raised: one line naming the URL, never a counted rejection."""
    root, _ = fixture_tree
    wanted = image_records(root)[1:3]
    path = wanted[1]["coco_url"].split("cocodataset.org")[1]
    final = faults == ["status:403"]
    server.inject(path, *faults * (1 if final else FAST.retries + 1))
    with pytest.raises(PipelineError) as raised:
        fetch_per_image(wanted, tmp_path / "store", Sources.for_mirror(server.url, FAST), 1)
    assert str(raised.value).startswith(f"download {server.url}{path}: {reason}")
    assert server.hits[path] == (1 if final else FAST.retries + 1)
    assert not any(p.name.startswith(".") for p in (tmp_path / "store").iterdir())  # no temp file left
    if not final:  # one bad answer: the retry gets the file
        server.inject(path, faults[0])
    results = fetch_per_image(wanted, tmp_path / "store", Sources.for_mirror(server.url, FAST), 1)
    assert [outcome.reason for outcome in results.values()] == ["", ""]


def test_size_mismatch_and_non_jpeg_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    Image.new("RGB", (20, 10)).save(path, format="JPEG")
    assert verify_image(path, 20, 10) == ""
    assert verify_image(path, 30, 10) == "size 20x10 differs from annotated 30x10"
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    assert "JPEG only" in verify_image(path, 20, 10)


def zips_of(server: FixtureServer, manifest: dict) -> dict[str, tuple[str, str]]:
    return {
        f"{side}2017": (f"{server.url}/zips/{side}2017.zip", manifest["checksums"][f"zips/{side}2017.zip"])
        for side in ("train", "val")
    }


def test_zips_route_extracts_only_needed_files(fixture_tree, server: FixtureServer, tmp_path: Path) -> None:
    root, manifest = fixture_tree
    wanted = image_records(root)[1:6]
    results = fetch_from_zips(wanted, tmp_path / "store", zips_of(server, manifest), Sources.for_mirror(""), tmp_path / "dl")
    assert reasons(results) == {image["file_name"]: "" for image in wanted}
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted(results)
    first = wanted[0]["file_name"]
    assert results[first].record.url == f"{server.url}/zips/train2017.zip!/train2017/{first}"


def test_local_images_are_linked_and_store_is_pruned(tmp_path: Path) -> None:
    source = tmp_path / "own"
    (source / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(source / "images/a.jpg", format="JPEG")
    store = tmp_path / "store"
    store.mkdir()
    (store / "stale.jpg").write_bytes(b"old")
    wanted = [
        {"file_name": "a.jpg", "width": 8, "height": 8, "local_path": "images/a.jpg"},
        {"file_name": "b.jpg", "width": 8, "height": 8, "local_path": "images/b.jpg"},
    ]
    results = fetch_per_image(wanted, store, Sources.for_mirror("", own_root=source), 2)
    assert reasons(results) == {"a.jpg": "", "b.jpg": "missing local file images/b.jpg under download.source_path"}
    assert results["a.jpg"].record.url == "file:images/a.jpg"  # relative: the same wherever the repo is
    assert (store / "a.jpg").stat().st_ino == (source / "images/a.jpg").stat().st_ino  # a hard link, no copy
    assert prune_store(store, {"a.jpg"}) == 1 and not (store / "stale.jpg").exists()

    # The user replaces their file: the stored link no longer matches it, so it is linked again.
    (source / "images/a.jpg").unlink()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(source / "images/a.jpg", format="JPEG")
    again = fetch_per_image(wanted[:1], store, Sources.for_mirror("", own_root=source, previous=records(results)), 1)
    assert again["a.jpg"].action == "linked" and (store / "a.jpg").read_bytes() == (source / "images/a.jpg").read_bytes()


def stage_in(tmp_path: Path, wanted: list[dict], **download: object) -> dict:
    """Run the images stage in ``tmp_path`` on ``wanted``; return the index it wrote."""
    labels = tmp_path / "data/filtered/labels.json"
    labels.parent.mkdir(parents=True, exist_ok=True)
    labels.write_bytes(orjson.dumps({"images": wanted}))
    write_params(Path("params.yaml"), download={"image_workers": 2, "retries": 1, "backoff_s": 0.01, **download})
    images.main()
    return read_json(Path("data/images.json"))


def test_index_lists_kept_and_rejected_with_url_and_sha(fixture_tree, server: FixtureServer, tmp_path: Path) -> None:
    root, _ = fixture_tree
    index = stage_in(tmp_path, image_records(root)[:3], mirror=server.url)
    assert len(index["kept"]) == 2 and len(index["rejected"]) == 1
    for name in index["kept"]:
        assert index["files"][name]["sha256"] == file_digest(Path("data/images") / name)
        assert index["files"][name]["url"].startswith(server.url)
    assert read_json(Path("reports/images.json")) == {"images": 2, "rejected": 1, "local_path_ignored": 0}


def test_a_file_that_no_longer_matches_its_record_is_fetched_again(fixture_tree, server: FixtureServer, tmp_path: Path) -> None:
    root, _ = fixture_tree
    wanted = image_records(root)[1:4]
    first = stage_in(tmp_path, wanted, mirror=server.url)
    name = first["kept"][0]
    good = (Path("data/images") / name).read_bytes()
    Image.new("RGB", (320, 240), (9, 9, 9)).save(Path("data/images") / name, format="JPEG")  # valid, right size, wrong
    hits = sum(server.hits.values())
    assert stage_in(tmp_path, wanted, mirror=server.url) == first
    assert (Path("data/images") / name).read_bytes() == good
    assert sum(server.hits.values()) == hits + 1  # that one file, nothing else


def test_unchanged_files_are_reused_without_decoding(fixture_tree, server: FixtureServer, tmp_path: Path, monkeypatch) -> None:
    root, _ = fixture_tree
    wanted = image_records(root)[1:4]
    first = stage_in(tmp_path, wanted, mirror=server.url)
    decoded = []
    monkeypatch.setattr(store_module, "verify_image", lambda *args: decoded.append(args) or "")
    hits = sum(server.hits.values())
    assert stage_in(tmp_path, wanted, mirror=server.url) == first
    assert decoded == [] and sum(server.hits.values()) == hits


def test_a_wrong_image_from_one_mirror_is_replaced_when_the_mirror_changes(fixture_tree, tmp_path: Path) -> None:
    """A mirror served a valid JPEG of the right size but the wrong picture; another mirror serves the right one."""
    root, _ = fixture_tree
    wanted = image_records(root)[1:3]
    bad_root = tmp_path / "bad_mirror"
    shutil.copytree(root / "train2017", bad_root / "train2017")
    wrong = bad_root / "train2017" / wanted[0]["file_name"]
    Image.new("RGB", (320, 240), (255, 0, 255)).save(wrong, format="JPEG")
    with FixtureServer(bad_root) as bad, FixtureServer(root, host="127.0.0.2") as good:
        before = stage_in(tmp_path, wanted, mirror=bad.url)
        assert (Path("data/images") / wanted[0]["file_name"]).read_bytes() == wrong.read_bytes()
        after = stage_in(tmp_path, wanted, mirror=good.url)
        assert sum(good.hits.values()) == len(wanted)  # every URL changed: every file fetched again
    assert (Path("data/images") / wanted[0]["file_name"]).read_bytes() == (
        root / "train2017" / wanted[0]["file_name"]
    ).read_bytes()
    assert after["files"][wanted[0]["file_name"]]["sha256"] != before["files"][wanted[0]["file_name"]]["sha256"]
    assert after["files"][wanted[1]["file_name"]]["sha256"] == before["files"][wanted[1]["file_name"]]["sha256"]


def test_a_store_without_records_is_not_trusted(fixture_tree, server: FixtureServer, tmp_path: Path) -> None:
    """An index of an older format (or none) says nothing about where files came from: fetch them again."""
    root, _ = fixture_tree
    wanted = image_records(root)[1:3]
    first = stage_in(tmp_path, wanted, mirror=server.url)
    Path("data/images.json").write_text('{"kept": [], "rejected": {}}')
    hits = sum(server.hits.values())
    assert stage_in(tmp_path, wanted, mirror=server.url) == first
    assert sum(server.hits.values()) == hits + len(wanted)


def test_a_bad_moment_of_the_server_is_never_recorded(fixture_tree, server: FixtureServer, tmp_path: Path) -> None:
    """An image answered badly (empty, then an HTML page) through all of one run's retries, then well: the stage
    fails with one line naming it, and the next plain `dvc repro` ends where a clean run does (same dvc.lock).
    It used to be a counted rejection, exit 0, and "up to date" afterwards: one image fewer for good."""
    _, manifest = fixture_tree
    clean = make_repo(tmp_path / "clean", fixture_overrides(server, manifest))  # download.retries: 2
    run(["dvc", "repro", "filter"], clean)
    repo = shutil.copytree(clean, tmp_path / "repo", symlinks=True)  # the same state before the images stage
    run(["dvc", "repro", "images"], clean)
    image = read_json(clean / "data/filtered/labels.json")["images"][3]
    path = image["coco_url"].split("cocodataset.org")[1]
    hits = server.hits[path]

    server.inject(path, "empty", "html", "empty")
    failed = run(["dvc", "repro", "images"], repo, check=False)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert errors[0] == (
        f"error: download {server.url}{path}: empty response (0 bytes) after 3 attempts "
        "(rerun when the network and server are back, or set download.mirror)"
    ), failed.stderr
    assert server.hits[path] == hits + 3  # three bad answers, one per attempt
    again = run(["dvc", "repro", "images"], repo)  # the server is fine again: a plain repro, no -f
    assert "Running stage 'images'" in again.stdout
    assert (repo / "dvc.lock").read_text() == (clean / "dvc.lock").read_text()
    assert read_json(repo / "data/images.json") == read_json(clean / "data/images.json")
