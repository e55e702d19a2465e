"""Experiments on the tiny config: `dvc exp run -S`, a queued grid, and comparing them (`make compare`)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from testkit.repo_copy import ROOT, commit_all
from tests.conftest import PipelineRun, run, stages_run

AP_COLUMNS = ("keras.AP", "keras.AP50", "tflite.AP", "tflite.AP50")
# What DVC calls metrics: the columns an experimenter compares. Every other report is a plain output.
METRIC_FILES = {"reports/evaluate/metrics.json", "reports/export.json", "reports/timing/export.json"}
REPORTS = {
    "reports/filter.json",
    "reports/images.json",
    "reports/split.json",
    "reports/cache.json",
    "reports/train/metrics.json",
    "reports/timing/train/metrics.json",
    "reports/evaluate/coco.json",
}
MAX_COLUMNS = 30


@pytest.fixture(scope="module")
def exp_repo(tiny_pipeline: PipelineRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("experiments") / "repo"
    shutil.copytree(tiny_pipeline.repo, repo, symlinks=True)
    commit_all(repo, "baseline: tiny run")
    return repo


def wait_for_queue(repo: Path, timeout_s: float = 900) -> str:
    """Poll `dvc queue status` until nothing is queued or running; return the last table."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], repo).stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(2)
    raise AssertionError(f"queue still busy after {timeout_s:.0f} s:\n{status}")


def experiments(repo: Path) -> dict[str, dict]:
    """`dvc exp show --json`: each experiment's train and export params and evaluate metrics, by name."""
    shown = json.loads(run(["dvc", "exp", "show", "--json", "--no-fetch"], repo).stdout)
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            data = experiment["revs"][0]["data"]
            params = data["params"]["params.yaml"]["data"]
            found[experiment["name"]] = {
                "train": params["train"],
                "export": params["export"],
                "metrics": data["metrics"]["reports/evaluate/metrics.json"]["data"],
            }
    return found


@pytest.mark.slow
def test_exp_run_queue_grid_show_and_diff(exp_repo: Path) -> None:
    # The grid is queued from the committed baseline (epochs 1, learning rate 0.3: that point
    # reruns nothing, measured), and its worker trains beside the workspace experiment, which
    # changes only what export reads (so the workspace does not train beside the queue: the
    # suite's time budget).
    run(["dvc", "exp", "run", "--queue", "-S", "train.learning_rate=0.1,0.3"], exp_repo)
    assert run(["dvc", "queue", "status"], exp_repo).stdout.count("Queued") == 2
    run(["dvc", "queue", "start", "-j", "1"], exp_repo)
    single = run(["dvc", "exp", "run", "-n", "float16", "-S", "export.quantization=float16"], exp_repo)
    assert stages_run(single.stdout) == ["export", "evaluate"]
    assert json.loads((exp_repo / "models/metadata.json").read_text())["quantization"] == "float16"
    status = wait_for_queue(exp_repo)
    assert status.count("Success") == 2 and "Failed" not in status, status

    found = experiments(exp_repo)
    assert len(found) == 3 and found["float16"]["export"]["quantization"] == "float16", found.keys()
    grid = {info["train"]["learning_rate"]: name for name, info in found.items() if name != "float16"}
    assert set(grid) == {0.1, 0.3} and all(found[name]["train"]["epochs"] == 1 for name in grid.values())
    for name, info in found.items():
        for model in ("keras", "tflite"):
            for metric in ("AP", "AP50"):
                assert -1 <= info["metrics"][model][metric] <= 1, (name, model, metric)  # -1: no such objects
    header = run(["dvc", "exp", "show", "--csv", "--no-fetch"], exp_repo).stdout.splitlines()[0].split(",")
    assert set(AP_COLUMNS) <= set(header)  # the table the user reads has the AP columns

    low, high = grid[0.1], grid[0.3]
    diff = json.loads(run(["dvc", "exp", "diff", low, high, "--all", "--json"], exp_repo).stdout)
    rate = diff["params"]["params.yaml"]["train.learning_rate"]
    assert (rate["old"], rate["new"]) == (0.1, 0.3)
    assert set(AP_COLUMNS) <= set(diff["metrics"]["reports/evaluate/metrics.json"])

    plots = json.loads(run(["dvc", "plots", "diff", low, high, "--json"], exp_repo).stdout)
    assert not plots.get("errors"), plots.get("errors")
    losses = plots["data"]["reports/train/plots/metrics/val/total_loss.tsv"]
    assert {rev for entry in losses for rev in entry["revisions"]} == {low, high}
    assert {point["rev"] for entry in losses for point in entry["content"]["data"]["values"]} == {low, high}


def declared_outputs() -> dict[str, tuple[str, dict]]:
    """Every output dvc.yaml declares: path -> (outs | metrics | plots, its options)."""
    found = {}
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                found[path] = (kind, options or {})
    return found


def test_only_the_headline_files_are_metrics() -> None:
    declared = declared_outputs()
    assert {path for path, (kind, _) in declared.items() if kind == "metrics"} == METRIC_FILES
    # The data and training reports are still declared, as outputs that git keeps (cache: false).
    assert {path: declared[path][0] for path in REPORTS} == dict.fromkeys(REPORTS, "outs")
    assert all(declared[path][1].get("cache") is False for path in REPORTS | METRIC_FILES)


def compare(repo: Path) -> list[str]:
    """The header of `make compare` (the Makefile's own recipe) in ``repo``, as CSV."""
    # STAMP= : the test's venv is already the one make would set up (its stamp may predate the lock).
    table = run(["make", "-s", "compare", "STAMP=", f"REPO_DIR={repo}", "ARGS=--csv"], ROOT).stdout
    return table.splitlines()[0].split(",")


@pytest.mark.slow
def test_compare_shows_the_headline_in_at_most_30_columns(tiny_pipeline: PipelineRun) -> None:
    repo = tiny_pipeline.repo
    classes = yaml.safe_load((repo / "params.yaml").read_text())["filter"]["classes"]
    metrics = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    headline = {"tflite": {"AP", "AP50", *(f"AP50_{name}" for name in classes)}, "keras": {"AP", "AP50"}}
    assert {model: set(values) for model, values in metrics.items()} == headline
    assert all(-1 <= value <= 1 for values in metrics.values() for value in values.values())

    header = compare(repo)
    assert len(header) <= MAX_COLUMNS, header
    # The tiny run changed split.seed after its commit: the workspace row differs from HEAD in it alone.
    params = [column for column in header if column.split(".")[0] in ("download", "filter", "split", "train", "export")]
    assert params == ["split.seed"], header
    columns = {f"{model}.{name}" for model, names in headline.items() for name in names} | {"size_mb", "latency_ms"}
    assert columns <= set(header), columns - set(header)
    assert not [column for column in header if "/" in column or column == "Created"]  # no deps' hashes

    # A report that is no longer a metric still prints with `dvc metrics show <file>` (DVC 3).
    shown = json.loads(run(["dvc", "metrics", "show", "--json", "reports/filter.json"], repo).stdout)
    assert shown[""]["data"]["reports/filter.json"]["data"] == json.loads((repo / "reports/filter.json").read_text())
