"""Downloaded annotations are data, not instructions; every download has a deadline; broken archives get one line.

Each case runs the stages as dvc.yaml does (``python -m stages.<name>`` in a repository copy)
against a hostile copy of the fixture served on loopback, then checks: the exit status, one
line naming the cause (no traceback) when the input is unusable, a rejection with its reason
when only a record is bad, nothing written outside data/ models/ reports/, nothing
half-written, and a following good run that recovers the same bytes.
"""

from __future__ import annotations

import hashlib
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from PIL import Image

from testkit.fixture import ANNOTATIONS_ZIP, image_records
from testkit.fixture_server import FixtureServer
from tests.conftest import fixture_overrides, make_repo, set_param
from tests.stage_checks import digests, half_written, one_error_line, stage
from trafficdet.fetch import RetryPolicy
from trafficdet.io import read_json
from trafficdet.store import Sources, fetch_from_zips

DATA_STAGES = ("download", "filter", "images")
RECOVERED = ("data/raw", "data/filtered", "data/images", "data/images.json", "reports/images.json")


def md5(path: Path) -> str:
    return "md5:" + hashlib.md5(path.read_bytes()).hexdigest()


def hostile_copy(root: Path, dest: Path, edit: Callable[[dict[str, Any]], None]) -> str:
    """A copy of the fixture tree whose annotations zip holds ``edit``-ed train annotations; its md5."""
    shutil.copytree(root, dest)
    archive = dest / ANNOTATIONS_ZIP
    with zipfile.ZipFile(root / ANNOTATIONS_ZIP) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    train = orjson.loads(members["annotations/instances_train2017.json"])
    edit(train)
    members["annotations/instances_train2017.json"] = orjson.dumps(train)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return md5(archive)


def outputs_of(repo: Path) -> dict[str, str]:
    return {path: digest for path, digest in digests(repo, outputs=True).items() if path.startswith(RECOVERED)}


def run_data_stages(repo: Path) -> None:
    for name in DATA_STAGES:
        result = stage(repo, name)
        assert result.returncode == 0, f"{name}: {result.stderr}"


def restore(repo: Path, server: FixtureServer, manifest: dict[str, Any]) -> None:
    """Point the repository back at the clean fixture."""
    for key, value in fixture_overrides(server, manifest)["download"].items():
        set_param(repo, "download", key, value)


@pytest.fixture
def clean_repo(tmp_path: Path, fixture_tree, server: FixtureServer) -> tuple[Path, dict[str, str]]:
    """A repository copy after a clean run of the data stages, and the digests of what they wrote."""
    _, manifest = fixture_tree
    repo = make_repo(tmp_path / "repo", fixture_overrides(server, manifest))
    run_data_stages(repo)
    return repo, outputs_of(repo)


def test_downloaded_annotations_cannot_name_files_hosts_or_local_paths(
    fixture_tree, clean_repo, server: FixtureServer, tmp_path: Path
) -> None:
    root, manifest = fixture_tree
    repo, clean = clean_repo
    secret = tmp_path / "secret.jpg"  # a picture elsewhere on the machine, of the right size
    Image.new("RGB", (320, 240), (255, 0, 0)).save(secret, format="JPEG")
    selected = {image["file_name"] for image in read_json(repo / "data/filtered/labels.json")["images"]}
    names = [image["file_name"] for image in image_records(root)[1:] if image["file_name"] in selected][:11]  # train2017
    with FixtureServer(root, host="127.0.0.2") as other:
        hostile_names = {
            names[1]: "..",
            names[2]: ".",
            names[3]: "",
            names[4]: "/etc/hostname",
            names[5]: "a\0b.jpg",
            names[6]: "x" * 300 + ".jpg",
        }

        def edit(coco: dict[str, Any]) -> None:
            by_name = {image["file_name"]: image for image in coco["images"]}
            by_name[names[0]]["local_path"] = str(secret)
            for name, hostile in hostile_names.items():
                by_name[name]["file_name"] = hostile
            by_name[names[7]]["coco_url"] = "file:///etc/passwd"
            by_name[names[8]]["coco_url"] = f"{other.url}/train2017/{names[8]}"
            by_name[names[9]]["coco_url"] = "ftp://images.cocodataset.org/x.jpg"

        checksum = hostile_copy(root, tmp_path / "hostile", edit)
        with FixtureServer(tmp_path / "hostile") as hostile:
            set_param(repo, "download", "mirror", hostile.url)
            set_param(repo, "download", "annotations_checksum", checksum)
            outside = digests(repo, outputs=False)
            run_data_stages(repo)  # bad records are rejected; they never stop a stage
            before = read_json(repo / "data/images.json")
            # A redirect is the server's answer of the moment, not the record's: refused, it stops the stage.
            (repo / "data/images" / names[10]).unlink()  # so that it is fetched again
            hostile.inject(f"/train2017/{names[10]}", f"redirect:{other.url}/train2017/{names[10]}")
            refused = f"/train2017/{names[10]}: redirect to {other.url}/"
            one_error_line(stage(repo, "images"), refused, "refused: host '127.0.0.2'")
            assert read_json(repo / "data/images.json") == before and half_written(repo) == []
            assert stage(repo, "images").returncode == 0  # no redirect now: the file comes from the mirror again
        assert sum(other.hits.values()) == 0  # nothing fetched from a host nobody configured

    index = read_json(repo / "data/images.json")
    rejected = index["rejected"]
    assert rejected[".."] == "file_name '..' is not a file name"
    assert rejected["."] == "file_name '.' is not a file name"
    assert rejected[""] == "file_name '' is not a file name"
    assert rejected["a\0b.jpg"] == "file_name contains a NUL character"
    assert rejected["x" * 300 + ".jpg"] == "file_name is 304 bytes long (at most 255)"
    assert rejected[names[7]].endswith("scheme file: is not fetched (http and https only)")
    assert rejected[names[9]].endswith("scheme ftp: is not fetched (http and https only)")
    assert rejected[names[8]].endswith(
        "host '127.0.0.2' is neither the annotations' host nor the mirror (add it to download.allowed_hosts to allow it)"
    )
    # An absolute name is flattened by the filter into one file inside the store.
    assert "__etc__hostname" in index["kept"] and (repo / "data/images/__etc__hostname").is_file()
    # local_path in downloaded annotations is ignored: the image came from its URL, not from the file named.
    assert (repo / "data/images" / names[0]).read_bytes() == (root / "train2017" / names[0]).read_bytes()
    assert (repo / "data/images" / names[0]).stat().st_ino != secret.stat().st_ino
    assert read_json(repo / "reports/images.json")["local_path_ignored"] == 1
    assert sorted(p.name for p in (repo / "data/images").iterdir()) == index["kept"]
    assert digests(repo, outputs=False) == outside and half_written(repo) == []

    restore(repo, server, manifest)  # the source is fixed: the same bytes as the clean run
    run_data_stages(repo)
    assert outputs_of(repo) == clean


def test_a_local_path_must_stay_inside_your_own_folder(tmp_path: Path) -> None:
    """download.source: coco_folder honours local_path, but a file_name cannot lead it out of source_path."""
    repo = make_repo(tmp_path / "repo", {"download": {"source": "coco_folder", "source_path": "mine", "pretrained": "scratch"}})
    (repo / "mine/images/sub").mkdir(parents=True)
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (64, 48), (255, 0, 0)).save(secret, format="JPEG")
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "car"}]}
    for index, name in enumerate(["a.jpg", "b.jpg", "sub/../../../secret.jpg"], start=1):
        if "secret" not in name:
            Image.new("RGB", (64, 48), (index * 40, 90, 90)).save(repo / "mine/images" / name, format="JPEG")
        coco["images"].append({"id": index, "file_name": name, "width": 64, "height": 48})
        coco["annotations"].append({"id": index, "image_id": index, "category_id": 1, "bbox": [4, 5, 20, 20], "iscrowd": 0})
    (repo / "mine/labels.json").write_bytes(orjson.dumps(coco))
    set_param(repo, "filter", "classes", ["car"])
    set_param(repo, "filter", "include_all", [])
    set_param(repo, "filter", "images_per_class", "all")
    outside = digests(repo, outputs=False)
    run_data_stages(repo)
    index = read_json(repo / "data/images.json")
    assert index["kept"] == ["a.jpg", "b.jpg"]
    assert index["files"]["a.jpg"]["url"] == "file:images/a.jpg"
    assert index["rejected"] == {
        "sub__..__..__..__secret.jpg": "local_path 'images/sub/../../../secret.jpg' is outside download.source_path (mine)"
    }
    assert "secret" not in " ".join(p.name for p in (repo / "data/images").iterdir())
    # The raw annotations name files relative to the folder: the same bytes wherever the repository is.
    own = read_json(repo / "data/raw/annotations/instances_own.json")
    assert [image["local_path"] for image in own["images"]] == ["images/a.jpg", "images/b.jpg", "images/sub/../../../secret.jpg"]
    assert digests(repo, outputs=False) == outside and half_written(repo) == []


def corrupt_deflate(archive: Path, member: str) -> None:
    """Give ``member``'s deflate stream a reserved block type (0b11): zlib cannot decode it at all."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(member)
    data = bytearray(archive.read_bytes())
    with archive.open("rb") as handle:  # the local header's name and extra lengths give the data offset
        handle.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(handle.read(2), "little"), int.from_bytes(handle.read(2), "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start] = 0b111  # BFINAL 1, BTYPE 11
    archive.write_bytes(bytes(data))


def test_a_corrupt_deflate_stream_in_the_annotations_zip_is_one_line(
    fixture_tree, clean_repo, server: FixtureServer, tmp_path: Path
) -> None:
    root, manifest = fixture_tree
    repo, clean = clean_repo
    hostile_copy(root, tmp_path / "broken", lambda coco: None)
    corrupt_deflate(tmp_path / "broken" / ANNOTATIONS_ZIP, "annotations/instances_train2017.json")
    with FixtureServer(tmp_path / "broken") as broken:
        set_param(repo, "download", "mirror", broken.url)
        set_param(repo, "download", "annotations_checksum", "")  # unpinned: the archive is only checked by unzipping it
        outside = digests(repo, outputs=False)
        line = one_error_line(
            stage(repo, "download"), "annotations_trainval2017.zip: truncated or corrupt zip archive", "delete it"
        )
    assert "Error -3 while decompressing" in line  # zlib's own words for the broken stream
    assert digests(repo, outputs=False) == outside and half_written(repo) == []
    assert outputs_of(repo) == clean  # the previous outputs are untouched

    restore(repo, server, manifest)
    run_data_stages(repo)
    assert outputs_of(repo) == clean


def test_a_corrupt_member_of_an_image_zip_is_rejected(fixture_tree, tmp_path: Path) -> None:
    root, _ = fixture_tree
    served = tmp_path / "served"
    shutil.copytree(root / "zips", served / "zips")
    wanted = image_records(root)[1:4]
    corrupt_deflate(served / "zips/train2017.zip", f"train2017/{wanted[0]['file_name']}")
    with FixtureServer(served) as srv:
        zips = {side: (f"{srv.url}/zips/{side}.zip", md5(served / f"zips/{side}.zip")) for side in ("train2017", "val2017")}
        results = fetch_from_zips(wanted, tmp_path / "store", zips, Sources.for_mirror(""), tmp_path / "dl")
    assert results[wanted[0]["file_name"]].reason.startswith(
        f"corrupt member train2017/{wanted[0]['file_name']} in train2017.zip"
    )
    assert [outcome.reason for outcome in results.values()].count("") == 2
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted(image["file_name"] for image in wanted[1:])


def test_a_trickling_image_server_ends_within_its_deadline(fixture_tree, clean_repo, server: FixtureServer) -> None:
    root, _ = fixture_tree
    repo, clean = clean_repo
    name = image_records(root)[3]["file_name"]
    size = (root / "train2017" / name).stat().st_size
    (repo / "data/images" / name).unlink()  # so that it is fetched again
    policy = RetryPolicy(retries=0, backoff_s=0.01, timeout_s=1, min_kbytes_per_s=size / 1000)  # deadline 2 s
    for key in ("retries", "timeout_s", "min_kbytes_per_s"):
        set_param(repo, "download", key, getattr(policy, key))
    server.inject(f"/train2017/{name}", "trickle:1:1")  # the whole file would take hours
    outside = digests(repo, outputs=False)
    started = time.monotonic()
    result = stage(repo, "images")
    elapsed = time.monotonic() - started
    one_error_line(
        result, f"download {server.url}/train2017/{name}: timed out", "download.timeout_s", "download.min_kbytes_per_s"
    )
    # The deadline, plus the interpreter's start-up and the other images: far below the trickle's hours.
    assert elapsed < policy.deadline_s(size) * (policy.retries + 1) + 30
    assert digests(repo, outputs=False) == outside and half_written(repo) == []
    assert not (repo / "data/images" / name).exists()

    result = stage(repo, "images")  # the server is fine again
    assert result.returncode == 0, result.stderr
    assert outputs_of(repo) == clean
