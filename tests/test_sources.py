"""Bring your own dataset: COCO and PASCAL VOC folders flow through filter and split."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from stages import download, split
from stages import filter as filter_stage
from trafficdet.errors import PipelineError
from trafficdet.fetch import RetryPolicy
from trafficdet.io import write_json
from trafficdet.params import FilterParams
from trafficdet.sources import import_coco_folder, import_voc_folder
from trafficdet.store import Sources, fetch_per_image

VOC_XML = """<annotation><filename>{name}</filename><size><width>64</width><height>48</height><depth>3</depth></size>
<object><name>{cls}</name><difficult>0</difficult><bndbox><xmin>4</xmin><ymin>5</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>
</annotation>"""


def make_voc(root: Path, n: int = 10) -> None:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for index in range(n):
        name = f"img{index}.jpg"
        Image.new("RGB", (64, 48), (index * 20, 90, 90)).save(root / "JPEGImages" / name, format="JPEG")
        (root / "Annotations" / f"img{index}.xml").write_text(VOC_XML.format(name=name, cls="car" if index % 3 else "bus"))


def test_voc_folder_converts_to_coco(tmp_path: Path) -> None:
    make_voc(tmp_path / "voc", 3)
    coco = import_voc_folder(tmp_path / "voc")
    assert [c["name"] for c in coco["categories"]] == ["bus", "car"]
    assert coco["annotations"][0]["bbox"] == [4.0, 5.0, 26.0, 35.0]
    assert coco["images"][0]["local_path"].endswith("JPEGImages/img0.jpg")


def test_bad_voc_xml_is_named(tmp_path: Path) -> None:
    make_voc(tmp_path / "voc", 1)
    (tmp_path / "voc/Annotations/img0.xml").write_text("<annotation><size><width>x</width></size></annotation>")
    with pytest.raises(PipelineError, match=r"img0\.xml: missing or non-numeric <width>"):
        import_voc_folder(tmp_path / "voc")
    (tmp_path / "voc/Annotations/img0.xml").write_text("<annotation>")
    with pytest.raises(PipelineError, match=r"img0\.xml: not valid XML"):
        import_voc_folder(tmp_path / "voc")


def test_coco_folder_needs_images_beside_labels(tmp_path: Path) -> None:
    (tmp_path / "own").mkdir()
    write_json(tmp_path / "own/labels.json", {"images": [], "annotations": [], "categories": []})
    with pytest.raises(PipelineError, match=r"own: no images/ \(or data/\) folder"):
        import_coco_folder(tmp_path / "own")
    with pytest.raises(PipelineError, match="dataset folder not found"):
        import_coco_folder(tmp_path / "missing")


@pytest.mark.parametrize("kind", ["voc", "coco_folder"])
def test_own_dataset_flows_through_filter_images_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.chdir(tmp_path)
    make_voc(tmp_path / "voc", 10)
    source = tmp_path / "voc"
    if kind == "coco_folder":  # the same data as a COCO folder
        coco = import_voc_folder(source)
        (tmp_path / "coco/images").mkdir(parents=True)
        for image in coco["images"]:
            (source / image.pop("local_path")).rename(tmp_path / "coco/images" / image["file_name"])
        write_json(tmp_path / "coco/labels.json", coco)
        source = tmp_path / "coco"
    download.import_own_dataset(kind, source)
    download.download_relabel("", "", RetryPolicy())
    params = FilterParams(
        classes=["car", "bus"],
        include_all=[],
        keep_all_from=["val2017"],  # the params.yaml default: no effect on your own data
        images_per_class="all",
        seed=0,
        unrelabelled_lights="exclude",
        min_box_side=1,
    )
    files = sorted(Path("data/raw/annotations").glob("instances_*.json"))
    coco, _, report = filter_stage.filter_dataset(files, filter_stage.relabel_files(), params)
    assert report["classes"] == {
        "car": {"images": 6, "annotations": 6, "crowd_regions": 0},
        "bus": {"images": 4, "annotations": 4, "crowd_regions": 0},
    }
    assert report["origins"] == {"own": 10}
    results = fetch_per_image(coco["images"], Path("data/images"), Sources.for_mirror("", own_root=source), 2)
    assert not any(outcome.reason for outcome in results.values())
    _sides, split_report = split.split_dataset(coco, set(results), "stratified", 0.2, 0)
    assert split_report["val"]["classes"]["bus"]["images"] >= 1 and split_report["train"]["classes"]["bus"]["images"] >= 1


def test_image_sizes_left_out_are_read_from_the_image_files(tmp_path: Path) -> None:
    """Many tools write no width/height (COCO) or no <size> (VOC): the own folder's file header gives them."""
    (tmp_path / "own/images").mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(tmp_path / "own/images/a.jpg", format="JPEG")
    Image.new("RGB", (30, 20)).save(tmp_path / "own/images/b.jpg", format="JPEG")
    images = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg", "width": 0, "height": 0}]
    write_json(tmp_path / "own/labels.json", {"images": images, "annotations": [], "categories": []})
    coco = import_coco_folder(tmp_path / "own")
    assert [(image["width"], image["height"]) for image in coco["images"]] == [(64, 48), (30, 20)]
    images.append({"id": 3, "file_name": "gone.jpg", "height": 5})
    write_json(tmp_path / "own/labels.json", {"images": images, "annotations": [], "categories": []})
    with pytest.raises(
        PipelineError, match=r"labels\.json: image 'gone\.jpg' has no 'width', and \S+gone\.jpg to read it from is missing"
    ):
        import_coco_folder(tmp_path / "own")

    make_voc(tmp_path / "voc", 2)
    xml = tmp_path / "voc/Annotations/img0.xml"
    xml.write_text(xml.read_text().replace("<size><width>64</width><height>48</height><depth>3</depth></size>", ""))
    (tmp_path / "voc/Annotations/img1.xml").write_text(
        VOC_XML.format(name="img1.jpg", cls="car").replace(
            "<width>64</width><height>48</height>", "<width>0</width><height>0</height>"
        )
    )
    assert [(image["width"], image["height"]) for image in import_voc_folder(tmp_path / "voc")["images"]] == [(64, 48)] * 2
    (tmp_path / "voc/JPEGImages/img0.jpg").write_bytes(b"not an image")
    with pytest.raises(
        PipelineError, match=r"img0\.xml: no <size> with a positive <width> and <height>, and \S+img0\.jpg does not tell"
    ):
        import_voc_folder(tmp_path / "voc")
