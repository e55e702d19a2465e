"""`dvc repro` of the whole pipeline in a temporary repo against the loopback fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_MODEL, PipelineRun, fixture_overrides, make_repo, run, set_param, stages_run

__all__ = ["TINY_MODEL", "detect", "set_param"]  # other test modules import these from here
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"]


def tflite_labels(model: Path) -> list[str]:
    from mediapipe.tasks.python.metadata.metadata import MetadataDisplayer

    displayer = MetadataDisplayer.with_model_file(str(model))
    return displayer.get_associated_file_buffer("labels.txt").decode().splitlines()


def detect(model: Path, image: Path) -> list:
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions
    from mediapipe.tasks.python.vision import ObjectDetector, ObjectDetectorOptions

    options = ObjectDetectorOptions(base_options=BaseOptions(model_asset_path=str(model)), score_threshold=0.0, max_results=5)
    with ObjectDetector.create_from_options(options) as detector:
        return detector.detect(mp.Image.create_from_file(str(image))).detections


@pytest.mark.slow
def test_repro_end_to_end(tiny_pipeline: PipelineRun) -> None:
    repo, outputs = tiny_pipeline.repo, tiny_pipeline.outputs

    # Data half: through the cache, then incremental.
    assert stages_run(outputs["data"]) == ["download", "filter", "images", "split", "cache"]
    train = json.loads((repo / "data/split/train/labels.json").read_text())
    assert [c["id"] for c in train["categories"]] == list(range(1, 10))
    assert (repo / "data/images" / train["images"][0]["file_name"]).is_file()
    cache = json.loads((repo / "data/cache/train/cache.json").read_text())
    assert cache["size"] == len(train["images"])
    rejected = json.loads((repo / "data/images.json").read_text())["rejected"]
    assert len(rejected) == 1 and ": corrupt image: " in next(iter(rejected.values()))  # "<url>: corrupt image: ..."
    assert stages_run(outputs["data_again"]) == []
    # split.seed does not move COCO's own split: the split stage reruns, writes the same files, and
    # DVC skips the cache stage, whose inputs did not change.
    assert stages_run(outputs["split_changed"]) == ["split"]
    split_report = json.loads((repo / "reports/split.json").read_text())
    val = json.loads((repo / "data/split/val/labels.json").read_text())
    assert split_report["method"] == "coco" and {image["origin"] for image in val["images"]} == {"val2017"}
    assert {image["origin"] for image in train["images"]} == {"train2017"}
    assert split_report["val"]["crowd_regions"] > 0 and any(ann["iscrowd"] for ann in val["annotations"])
    assert json.loads((repo / "data/cache/val/cache.json").read_text())["origins"] == {"val2017": len(val["images"])}
    lights = json.loads((repo / "reports/filter.json").read_text())["unrelabelled_lights"]
    assert lights["images_left_out"] == 4 and lights["handling"] == "exclude"

    # Model half.
    assert stages_run(outputs["model"]) == ["train", "export", "evaluate"]
    classes = yaml.safe_load((repo / "params.yaml").read_text())["filter"]["classes"]
    model = repo / "models/model.tflite"
    assert tflite_labels(model) == classes  # the class outputs: no background
    assert (repo / "models/labels.txt").read_text().split() == classes
    assert json.loads((repo / "models/metadata.json").read_text())["quantization"] == "float32"
    assert "warning" not in outputs["model"]  # scratch init: no COCO-trained start point to have seen validation
    detections = detect(model, repo / "data/images" / val["images"][0]["file_name"])  # loads and runs in Tasks
    assert len(detections) <= 5 and {d.categories[0].category_name for d in detections} <= set(classes)

    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    # The headline is what DVC calls metrics (test_experiments checks its keys); every COCO number is in coco.json.
    assert set(shown[""]["data"]) == {"reports/evaluate/metrics.json", "reports/export.json", "reports/timing/export.json"}
    metrics = shown[""]["data"]["reports/evaluate/metrics.json"]["data"]
    coco = json.loads((repo / "reports/evaluate/coco.json").read_text())
    for name in ("keras", "tflite"):
        assert set(METRICS) <= set(coco[name])
        assert set(coco[name]["per_class"]) == set(classes)
        assert all(-1 <= coco[name][m] <= 1 for m in METRICS)
        assert (metrics[name]["AP"], metrics[name]["AP50"]) == (coco[name]["AP"], coco[name]["AP50"])
    assert all(metrics["tflite"][f"AP50_{c}"] == coco["tflite"]["per_class"][c]["AP50"] for c in classes)
    assert "val_total_loss" in coco["keras"]
    # What the app must feed the model (metadata) and what it then gets (the card, from this evaluation).
    contract = json.loads((repo / "models/metadata.json").read_text())["input"]
    assert contract["geometry"] == "letterbox" and contract["options"] == {}
    card = (repo / "models/MODEL_CARD.md").read_text()
    assert "top-left corner" in card and "no option is needed" in card
    tflite_row = next(line for line in card.splitlines() if line.startswith("| TFLite, as the app runs it"))
    assert tflite_row.split("|")[2].strip() == f"{metrics['tflite']['AP']:.3f}"
    assert shown[""]["data"]["reports/export.json"]["data"] == {"size_mb": round(model.stat().st_size / 2**20, 3)}
    assert shown[""]["data"]["reports/timing/export.json"]["data"]["latency_ms"] > 0
    for plot in (
        "reports/train/plots/metrics/train/total_loss.tsv",
        "reports/train/plots/metrics/val/total_loss.tsv",
        "reports/train/plots/metrics/learning_rate.tsv",
        "reports/evaluate/plots/ap/tflite.json",
        "reports/evaluate/plots/pr/tflite_car.json",
        "reports/evaluate/plots/images/predictions.png",
        "reports/evaluate/plots/images/confusion_matrix.png",
    ):
        assert (repo / plot).is_file(), plot
    rendered = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)
    assert "reports/train/plots/metrics/val/total_loss.tsv" in rendered["data"] and not rendered.get("errors")
    assert "reports/evaluate/plots/pr/tflite_car.json" in rendered["data"]
    assert "reports/evaluate/plots/images/confusion_matrix.png" in rendered["data"]
    # The confusion matrix has a column per class and background; every object of the split counts once in its column.
    confusion = json.loads((repo / "reports/evaluate/confusion.json").read_text())
    assert confusion["labels"] == [*classes, "background"] and confusion["score_threshold"] == 0.25
    assert sum(sum(row[:-1]) for row in confusion["matrix"]) == sum(not ann["iscrowd"] for ann in val["annotations"])
    assert isinstance(json.loads((repo / "reports/evaluate/detections.json").read_text()), list)
    assert json.loads((repo / "models/metadata.json").read_text())["detection_step"]["score_threshold"] == 0.05

    assert stages_run(outputs["model_again"]) == []  # a param change reruns only its stages: see test_remote


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
