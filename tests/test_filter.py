"""filter: overlay and its unrelabelled lights, class remap to 1..K, box cleaning, crowds, the selection rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stages import download
from stages import filter as filter_stage
from testkit.fixture import ANNOTATIONS_ZIP, RELABEL_ZIP
from testkit.fixture_server import FixtureServer
from trafficdet.errors import PipelineError
from trafficdet.fetch import RetryPolicy
from trafficdet.overlay import published_side
from trafficdet.params import FilterParams

LIGHT_CLASSES = ("traffic_light_red", "traffic_light_green", "traffic_light_na")

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
    "keep_all_from": ["val2017"],
    "images_per_class": "all",
    "seed": 1,
    "unrelabelled_lights": "exclude",
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
    _coco, _, report = filter_stage.filter_dataset(*raw, params(unrelabelled_lights="traffic_light"))
    lights = {name: report["classes"][name]["annotations"] for name in LIGHT_CLASSES}
    assert all(count > 0 for count in lights.values())
    assert report["overlay"]["relabelled"] == sum(lights.values())  # every light it relabelled is kept
    assert report["dropped"]["other_class"] > 0  # the dogs


def source_annotations(files: list[Path]) -> list[dict]:
    return [ann for path in files for ann in json.loads(path.read_text())["annotations"]]


def test_no_kept_image_has_a_light_without_a_light_class_box(raw, fixture_tree, tmp_path: Path) -> None:
    """The fixture's overlay leaves lights at COCO's id 10 both ways: kept at 10, and in images it does not cover."""
    files, _ = raw
    _, manifest = fixture_tree
    gaps = manifest["gaps"]
    source = source_annotations(files)
    lights = {ann["id"]: ann["image_id"] for ann in source if ann["category_id"] == 10}  # every light region, by COCO
    mislabelled_images = {lights[ann_id] for ann_id in gaps["mislabelled_annotations"]}
    assert gaps["outside_images"] and mislabelled_images  # the fixture holds both kinds

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"filter": DEFAULTS}))  # the stage as dvc runs it
    filter_stage.main()
    coco = json.loads(Path("data/filtered/labels.json").read_text())
    report = json.loads(Path("reports/filter.json").read_text())
    light_ids = {c["id"] for c in coco["categories"] if c["name"] in LIGHT_CLASSES}
    boxes = {ann["id"]: ann for ann in coco["annotations"]}
    kept = {image["id"] for image in coco["images"]}
    for ann_id, image_id in lights.items():
        if image_id in kept:
            assert ann_id in boxes and boxes[ann_id]["category_id"] in light_ids, f"light {ann_id} of image {image_id}"
    assert not kept & (set(gaps["outside_images"]) | mislabelled_images)
    assert report["unrelabelled_lights"] == {
        "handling": "exclude",
        "images": {"mislabelled": len(mislabelled_images), "outside_overlay": len(gaps["outside_images"])},
        "images_left_out": len(mislabelled_images | set(gaps["outside_images"])),
        "ignore_regions": 0,
    }
    assert report["dropped"]["unrelabelled_light"] == sum(
        1
        for ann_id, image_id in lights.items()
        if image_id in set(gaps["outside_images"]) or ann_id in gaps["mislabelled_annotations"]
    )


def test_unrelabelled_lights_can_be_kept_as_one_more_class(raw, fixture_tree) -> None:
    files, _ = raw
    gaps = fixture_tree[1]["gaps"]
    coco, label_map, report = filter_stage.filter_dataset(*raw, params(unrelabelled_lights="traffic_light"))
    assert [c["name"] for c in coco["categories"]] == [*DEFAULTS["classes"], "traffic_light"]
    assert label_map[-1] == {"id": 10, "name": "traffic_light", "source_ids": [10]}
    lights = {ann["id"] for ann in source_annotations(files) if ann["category_id"] == 10}
    extra = {ann["id"] for ann in coco["annotations"] if ann["category_id"] == 10}
    outside = {
        ann["id"] for ann in source_annotations(files) if ann["category_id"] == 10 and ann["image_id"] in gaps["outside_images"]
    }
    assert extra == set(gaps["mislabelled_annotations"]) | outside and extra <= lights
    assert report["images"] == 40 and report["unrelabelled_lights"]["images_left_out"] == 0  # every image kept
    assert report["classes"]["traffic_light"]["images"] == len(gaps["outside_images"]) + 2


def test_crowd_regions_are_kept_with_coco_areas(raw, fixture_tree) -> None:
    files, _ = raw
    crowds = set(fixture_tree[1]["gaps"]["crowd_annotations"])
    source = {ann["id"]: ann for ann in source_annotations(files)}
    coco, _, report = filter_stage.filter_dataset(*raw, params(unrelabelled_lights="traffic_light"))
    kept_crowds = {ann["id"] for ann in coco["annotations"] if ann["iscrowd"]}
    assert kept_crowds == crowds and report["crowd_regions"] == len(crowds)
    for ann in coco["annotations"]:
        *_, w, h = ann["bbox"]
        if ann["bbox"] == source[ann["id"]]["bbox"]:  # not clipped
            assert ann["area"] == source[ann["id"]]["area"] < w * h  # COCO's (polygon or mask) area, not the box's
    assert report["classes"]["person"]["crowd_regions"] == len(crowds)


def write_coco(path: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_an_image_whose_only_boxes_are_crowds_is_not_selected_and_area_is_computed_when_absent(tmp_path: Path) -> None:
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in (1, 2)]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "iscrowd": 1},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 20], "iscrowd": 0},  # no area: a VOC-like source
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [20, 0, 50, 50], "iscrowd": 1, "area": 1000.5},
    ]
    source = write_coco(tmp_path / "instances_own.json", images, annotations, [{"id": 1, "name": "person"}])
    coco, _, report = filter_stage.filter_dataset([source], [], params(classes=["person"], include_all=[]))
    assert [image["id"] for image in coco["images"]] == [2]
    assert {ann["id"]: (ann["iscrowd"], ann["area"]) for ann in coco["annotations"]} == {2: (0, 200.0), 3: (1, 1000.5)}
    assert report["classes"]["person"] == {"images": 1, "annotations": 1, "crowd_regions": 1}


def test_keep_all_from_takes_every_val2017_image_and_samples_the_rest(raw) -> None:
    only_val = filter_stage.filter_dataset(*raw, params(include_all=[], images_per_class=0))[0]
    assert {image["origin"] for image in only_val["images"]} == {"val2017"}
    _, _, report = filter_stage.filter_dataset(*raw, params(images_per_class=0))
    assert report["selection"]["keep_all_from"] == {"val2017": report["origins"]["val2017"]}
    assert report["origins"]["val2017"] == 7  # 8 in the fixture, one left out for a mislabelled light
    none = filter_stage.filter_dataset(*raw, params(keep_all_from=[], include_all=[], images_per_class=0))[0]
    assert none["images"] == []


@pytest.mark.parametrize(
    ("name", "side"),
    [
        ("instances_train_traffic.json", "train"),
        ("instances_val_traffic.json", "val"),
        ("instances_trainTraffic.json", "train"),
        ("instances_valTraffic.json", "val"),
        ("instances_train_traffic_extended.json", "train"),
        ("instances_traffic_lights.json", None),
    ],
)
def test_cocotraffic_file_names_give_its_split(name: str, side: str | None) -> None:
    assert published_side(Path(name)) == side


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
    added = first["selection"]["added_per_class"]
    assert all(count <= 2 for count in added.values())
    lights_only = filter_stage.filter_dataset(*raw, params(images_per_class=0))[2]
    assert first["images"] == lights_only["images"] + sum(added.values())
    assert other["images"] == first["images"]  # same rule, different sample


def test_unknown_class_is_named(raw) -> None:
    with pytest.raises(PipelineError, match=r"filter\.classes: 'tram' is not a category"):
        filter_stage.filter_dataset(*raw, params(classes=["car", "tram"], include_all=[]))


def test_light_colours_need_the_overlay(raw) -> None:
    files, _ = raw
    with pytest.raises(PipelineError, match=r"overlay is off: set download\.relabel_url, or use 'traffic light'"):
        filter_stage.filter_dataset(files, [], params())
    coco, _, report = filter_stage.filter_dataset(
        files, [], params(classes=["traffic light", "car"], include_all=["traffic light"])
    )
    assert [c["name"] for c in coco["categories"]] == ["traffic light", "car"]
    assert "unrelabelled_lights" not in report  # with the overlay off every light is COCO's class
    assert report["classes"]["traffic light"]["images"] == 40


def test_not_a_coco_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "instances_x.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(PipelineError, match=r"instances_x\.json: not a COCO annotation file"):
        filter_stage.filter_dataset([bad], [], params())
    broken = tmp_path / "instances_y.json"
    broken.write_text('{"images": [')
    with pytest.raises(PipelineError, match=r"instances_y\.json: not valid JSON"):
        filter_stage.filter_dataset([broken], [], params())


# --- every light is labelled, whatever classes and overlay -----------------------------------------------------

LIGHT_CHOICES = {
    "colours": [*LIGHT_CLASSES, "car"],
    "traffic light": ["traffic light", "car"],
    "no light class": ["car", "person"],
}


@pytest.fixture(scope="module")
def raw_once(tmp_path_factory: pytest.TempPathFactory, fixture_tree) -> tuple[list[Path], list[Path]]:
    """``raw``, fetched once for the many combinations below (the filter only reads these files)."""
    with pytest.MonkeyPatch.context() as patch, FixtureServer(fixture_tree[0]) as srv:
        patch.chdir(tmp_path_factory.mktemp("raw"))
        policy = RetryPolicy(retries=1, backoff_s=0.01)
        sums = fixture_tree[1]["checksums"]
        download.download_annotations(f"{srv.url}/{ANNOTATIONS_ZIP}", sums[ANNOTATIONS_ZIP], policy)
        download.download_relabel(f"{srv.url}/{RELABEL_ZIP}", sums[RELABEL_ZIP], policy)
        files = sorted(Path("data/raw/annotations").resolve().glob("instances_*.json"))
        return files, [path.resolve() for path in filter_stage.relabel_files()]


@pytest.mark.parametrize("handling", ["exclude", "traffic_light", "ignore"])
@pytest.mark.parametrize("choice", list(LIGHT_CHOICES))
@pytest.mark.parametrize("overlay", [True, False], ids=["overlay", "no_overlay"])
def test_no_light_in_a_kept_image_is_missing_from_its_labels(raw_once, fixture_tree, overlay, choice, handling) -> None:
    files, relabel = raw_once
    gaps = fixture_tree[1]["gaps"]
    classes = LIGHT_CHOICES[choice]
    chosen = params(classes=classes, include_all=[], unrelabelled_lights=handling)
    if choice == "colours" and not overlay:
        with pytest.raises(PipelineError, match=r"'traffic_light_red' is not a category .* overlay is off"):
            filter_stage.filter_dataset(files, [], chosen)
        return
    coco, label_map, report = filter_stage.filter_dataset(files, relabel if overlay else [], chosen)
    lights = {ann["id"]: ann for ann in source_annotations(files) if ann["category_id"] == 10}  # COCO's: every light
    names = {c["id"]: c["name"] for c in coco["categories"]}
    kept = {image["id"] for image in coco["images"]}
    labels: dict[int, list[dict]] = {}  # a light's labels: its own id, and for an ignore region its other classes' copies
    regions = {(a["image_id"], tuple(a["bbox"])): a["id"] for a in coco["annotations"] if a["iscrowd"] and a["id"] in lights}
    for ann in sorted(coco["annotations"], key=lambda ann: ann["category_id"]):
        labels.setdefault(regions.get((ann["image_id"], tuple(ann["bbox"])), ann["id"]), []).append(ann)
    unrelabelled = set(gaps["mislabelled_annotations"]) | {
        a for a, ann in lights.items() if ann["image_id"] in gaps["outside_images"]
    }
    in_kept = {ann_id for ann_id, ann in lights.items() if ann["image_id"] in kept}
    assert in_kept, "the fixture's lights must be in kept images for the claim to mean anything"

    if choice == "no light class":  # lights are another class, like the dogs: not in the labels at all
        assert not any(ann_id in labels for ann_id in lights)
        assert not {name for name in names.values() if "light" in name}
        return
    for ann_id in in_kept:
        assert ann_id in labels, f"light {ann_id} of kept image {lights[ann_id]['image_id']} is missing from the labels"
        given = [(names[ann["category_id"]], ann["iscrowd"]) for ann in labels[ann_id]]
        if choice == "traffic light":  # COCO's class: every light, whatever colour cocoTraffic gave it
            assert given == [("traffic light", 0)]
        elif ann_id not in unrelabelled:
            assert len(given) == 1 and given[0][0] in LIGHT_CLASSES and given[0][1] == 0
        elif handling == "traffic_light":
            assert given == [("traffic_light", 0)]
        else:  # ignore: an ignore region of every colour class (COCOeval matches crowds within a class)
            assert handling == "ignore" and given == [(name, 1) for name in LIGHT_CLASSES]
    if choice == "colours" and handling == "exclude":
        assert not in_kept & unrelabelled and report["unrelabelled_lights"]["images_left_out"] > 0
    if choice == "colours" and handling == "ignore":
        assert in_kept >= unrelabelled - {a for a, ann in lights.items() if ann["image_id"] not in kept}
        extra_ids = [ann["id"] for ann in coco["annotations"] if ann["iscrowd"] and ann["id"] not in lights]
        assert len(extra_ids) == 2 * report["unrelabelled_lights"]["ignore_regions"]  # the 2nd and 3rd colour's copies
        assert len({ann["id"] for ann in coco["annotations"]}) == len(coco["annotations"])  # ids stay unique
        assert min(extra_ids) > max(ann["id"] for ann in source_annotations(files))
    if choice == "traffic light":
        assert label_map[0]["source_ids"] == ([10, 92, 93, 94] if overlay else [10])
        assert "unrelabelled_lights" not in report  # no light is left without a class


def test_traffic_light_with_the_overlay_is_what_coco_labels(raw) -> None:
    """With the overlay on, COCO's class keeps its meaning: the same boxes and images as with the overlay off."""
    files, relabel = raw
    chosen = params(classes=["traffic light", "car"], include_all=["traffic light"])
    with_overlay, _, report = filter_stage.filter_dataset(files, relabel, chosen)
    without, _, _ = filter_stage.filter_dataset(files, [], chosen)
    assert with_overlay["annotations"] == without["annotations"]
    assert [{k: v for k, v in image.items() if k != "published_split"} for image in with_overlay["images"]] == without["images"]
    assert report["overlay"]["relabelled"] > 0 and report["classes"]["traffic light"]["images"] == 40


def test_traffic_light_and_its_colours_together_are_refused(raw) -> None:
    with pytest.raises(PipelineError) as raised:
        filter_stage.filter_dataset(*raw, params(classes=["traffic light", "traffic_light_red", "car"], include_all=[]))
    message = str(raised.value)
    assert message.startswith("params.yaml filter.classes: 'traffic light' (every traffic light, whatever its colour)")
    assert "traffic_light_red" in message and "choose 'traffic light' or the colours, not both" in message and "\n" not in message


def test_ignore_keeps_the_images_and_reports_the_regions(raw, fixture_tree) -> None:
    gaps = fixture_tree[1]["gaps"]
    exclude = filter_stage.filter_dataset(*raw, params())[2]
    coco, label_map, report = filter_stage.filter_dataset(*raw, params(unrelabelled_lights="ignore"))
    assert [entry["name"] for entry in label_map] == DEFAULTS["classes"]  # no extra class
    lights = report["unrelabelled_lights"]
    assert lights["handling"] == "ignore" and lights["images_left_out"] == 0
    assert report["images"] == exclude["images"] + exclude["unrelabelled_lights"]["images_left_out"] == 40
    outside = [a for a in source_annotations(raw[0]) if a["category_id"] == 10 and a["image_id"] in gaps["outside_images"]]
    assert lights["ignore_regions"] == len(gaps["mislabelled_annotations"]) + len(outside)
    crowds = sum(1 for ann in coco["annotations"] if ann["iscrowd"])
    assert report["crowd_regions"] == crowds == len(gaps["crowd_annotations"]) + 3 * lights["ignore_regions"]
    assert report["dropped"]["unrelabelled_light"] == 0


@pytest.mark.parametrize(("record", "found"), [({}, "missing"), ({"width": 0, "height": 240}, "0")])
def test_an_image_without_its_size_is_one_line_naming_file_and_field(tmp_path: Path, record: dict, found: str) -> None:
    images = [{"id": 1, "file_name": "a.jpg", "width": 320, "height": 240}, {"id": 2, "file_name": "b.jpg", **record}]
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 20, 20]} for i in (1, 2)]
    source = write_coco(tmp_path / "instances_own.json", images, annotations, [{"id": 1, "name": "car"}])
    with pytest.raises(PipelineError) as raised:
        filter_stage.filter_dataset([source], [], params(classes=["car"], include_all=[]))
    assert str(raised.value).startswith(f"{source}: image 2 ('b.jpg') has no 'width' ({found}): every image needs its width")
    assert "\n" not in str(raised.value)
