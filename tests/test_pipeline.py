"""`dvc repro` through the cache stage in a temporary repo against the loopback fixture."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import fixture_overrides, make_repo, run


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.mark.slow
def test_repro_is_reproducible_and_incremental(tmp_path: Path, fixture_tree, server) -> None:
    _, manifest = fixture_tree
    repo = make_repo(tmp_path / "repo", fixture_overrides(server, manifest))

    first = run(["dvc", "repro", "cache"], repo)
    assert stages_run(first.stdout) == ["download", "filter", "images", "split", "cache"]

    # Model Maker's layout, contiguous ids, links into the store, and a readable cache.
    train = json.loads((repo / "data/split/train/labels.json").read_text())
    assert [c["id"] for c in train["categories"]] == list(range(1, 10))
    assert {a["category_id"] for a in train["annotations"]} <= set(range(1, 10))
    some_image = repo / "data/split/train/images" / train["images"][0]["file_name"]
    assert some_image.is_symlink() and some_image.resolve().parent == (repo / "data/images").resolve()
    cache = json.loads((repo / "data/cache/train/cache.json").read_text())
    assert cache["size"] == len(train["images"])
    assert list(cache["label_map"].values())[1:4] == ["traffic_light_red", "traffic_light_green", "traffic_light_na"]
    rejected = json.loads((repo / "data/images.json").read_text())["rejected"]
    assert len(rejected) == 1 and next(iter(rejected.values())).startswith("corrupt image")

    second = run(["dvc", "repro", "cache"], repo)
    assert stages_run(second.stdout) == []
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo).stdout

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["split"]["seed"] += 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(["dvc", "repro", "cache"], repo)
    assert stages_run(third.stdout) == ["split", "cache"]


def test_stage_error_is_one_line_without_traceback(tmp_path: Path, fixture_tree, server) -> None:
    _, manifest = fixture_tree
    overrides = fixture_overrides(server, manifest)
    overrides["download"]["annotations_checksum"] = "md5:" + "0" * 32
    repo = make_repo(tmp_path / "repo", overrides)
    result = run(["python", "-m", "stages.download"], repo, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checksum mismatch" in errors[0] and "annotations_trainval2017.zip" in errors[0]
    assert not (repo / "data/raw/annotations").exists()
