"""filter: overlay, class remap to 1..K, box cleaning and the selection rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages import download
from stages import filter as filter_stage
from testkit.fixture import ANNOTATIONS_ZIP, RELABEL_ZIP
from trafficdet.errors import PipelineError
from trafficdet.fetch import RetryPolicy
from trafficdet.params import FilterParams

DEFAULTS = {
    "classes": [
        "traffic_light_red",
        "traffic_light_green",
        "traffic_light_na",
        "car",
        "truck",
        "bus",
        "motorcycle",
        "bicycle",
        "person",
    ],
    "include_all": ["traffic_light_red", "traffic_light_green", "traffic_light_na"],
    "images_per_class": "all",
    "seed": 1,
    "drop_crowd": True,
    "min_box_side": 1.0,
}


def params(**changes: object) -> FilterParams:
    return FilterParams.model_validate({**DEFAULTS, **changes})


@pytest.fixture
def raw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixture_tree, server) -> tuple[list[Path], list[Path]]:
    """The fixture's annotations and relabel files, fetched by the download stage."""
    monkeypatch.chdir(tmp_path)
    _, manifest = fixture_tree
    policy = RetryPolicy(retries=1, backoff_s=0.01)
    download.download_annotations(f"{server.url}/{ANNOTATIONS_ZIP}", manifest["checksums"][ANNOTATIONS_ZIP], policy)
    download.download_relabel(f"{server.url}/{RELABEL_ZIP}", manifest["checksums"][RELABEL_ZIP], policy)
    files = sorted(Path("data/raw/annotations").glob("instances_*.json"))
    return files, filter_stage.relabel_files()


def test_ids_are_contiguous_in_class_order(raw) -> None:
    coco, label_map, _report = filter_stage.filter_dataset(*raw, params())
    assert [c["id"] for c in coco["categories"]] == list(range(1, 10))
    assert [c["name"] for c in coco["categories"]] == DEFAULTS["classes"]
    assert {a["category_id"] for a in coco["annotations"]} == set(range(1, 10))
    assert label_map[0] == {"id": 1, "name": "traffic_light_red", "source_ids": [92]}
    assert label_map[3]["source_ids"] == [3]  # car keeps its COCO id as the source


def test_overlay_splits_lights_by_state(raw) -> None:
    _coco, _, report = filter_stage.filter_dataset(*raw, params())
    lights = {name: report["classes"][name]["annotations"] for name in DEFAULTS["include_all"]}
    assert all(count > 0 for count in lights.values())
    assert report["overlay"]["relabelled"] == sum(lights.values())
    assert report["dropped"]["other_class"] > 0  # the dogs


def test_bad_boxes_are_dropped_and_counted(raw) -> None:
    coco, _, report = filter_stage.filter_dataset(*raw, params())
    assert report["dropped"]["degenerate"] == 1 and report["dropped"]["outside_image"] == 1
    assert report["clipped_kept"] == 1
    for ann in coco["annotations"]:
        image = next(i for i in coco["images"] if i["id"] == ann["image_id"])
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]


@pytest.mark.parametrize(
    ("bbox", "expected"),
    [
        ([10, 10, 5, 5], ([10, 10, 5, 5], "")),
        ([-2, 10, 5, 5], ([0.0, 10, 3, 5], "clipped")),
        ([10, 10, 0, 5], (None, "degenerate")),
        ([200, 10, 5, 5], (None, "outside_image")),
        ([10, 10, float("nan"), 5], (None, "malformed")),
        ([10, 10, 5], (None, "malformed")),
        ([99.5, 10, 0.4, 5], (None, "too_small")),
    ],
)
def test_clean_box(bbox, expected) -> None:
    assert filter_stage.clean_box(bbox, 100, 100, 1.0) == expected


def test_clipped_box_fits_exactly() -> None:
    box, _ = filter_stage.clean_box([0.1 + 0.2, 0.0, 100.0, 10.0], 100.3, 50, 1.0)
    assert box[0] + box[2] <= 100.3


def test_selection_rule_is_seeded_and_bounded(raw) -> None:
    first = filter_stage.filter_dataset(*raw, params(images_per_class=2))[2]
    again = filter_stage.filter_dataset(*raw, params(images_per_class=2))[2]
    other = filter_stage.filter_dataset(*raw, params(images_per_class=2, seed=99))[2]
    assert first == again
    assert all(count <= 2 for count in first["added_per_class"].values())
    lights_only = filter_stage.filter_dataset(*raw, params(images_per_class=0))[2]
    assert first["images"] == lights_only["images"] + sum(first["added_per_class"].values())
    assert other["images"] == first["images"]  # same rule, different sample


def test_unknown_class_is_named(raw) -> None:
    with pytest.raises(PipelineError, match=r"filter\.classes: 'tram' is not a category"):
        filter_stage.filter_dataset(*raw, params(classes=["car", "tram"], include_all=[]))


def test_light_colours_need_the_overlay(raw) -> None:
    files, _ = raw
    with pytest.raises(PipelineError, match=r"overlay is off: set download\.relabel_url, or use 'traffic light'"):
        filter_stage.filter_dataset(files, [], params())
    coco, _, _ = filter_stage.filter_dataset(files, [], params(classes=["traffic light", "car"], include_all=["traffic light"]))
    assert [c["name"] for c in coco["categories"]] == ["traffic light", "car"]


def test_not_a_coco_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "instances_x.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(PipelineError, match=r"instances_x\.json: not a COCO annotation file"):
        filter_stage.filter_dataset([bad], [], params())
    broken = tmp_path / "instances_y.json"
    broken.write_text('{"images": [')
    with pytest.raises(PipelineError, match=r"instances_y\.json: not valid JSON"):
        filter_stage.filter_dataset([broken], [], params())
