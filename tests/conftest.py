"""Shared test fixtures: the synthetic source tree, its loopback server, temp repo copies, the S3 store."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from filelock import FileLock

from testkit.fixture import download_params, generate
from testkit.fixture_server import FixtureServer
from testkit.keras_weights import add_to_fixture
from testkit.object_store import ACCESS_KEY, SECRET_KEY, ObjectStore
from testkit.repo_copy import ROOT, copy_repo

BIN = Path(sys.executable).parent


# `make test` hands whole files to 2 xdist workers in collection order (--dist loadfile
# --no-loadscope-reorder): the longest files go first so the workers end together, and the first
# one needs no tiny_pipeline, so one worker has work while the other builds it. Measured
# (BENCHMARKS.md, "make test from a fresh clone"); the other files follow alphabetically.
LONGEST_FIRST = (
    "test_own_dataset.py",
    "test_learned_model.py",
    "test_training.py",
    "test_distribute.py",
    "test_experiments.py",
    "test_reproducible.py",
    "test_speed.py",
    "test_remote.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def fixture_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """40 synthetic scenes, with bad boxes and one truncated JPEG, in the real sources' layout."""
    root = tmp_path_factory.mktemp("fixture")
    return root, generate(root, images=40, seed=0, bad_boxes=True, corrupt_images=1)


@pytest.fixture(scope="session")
def keras_weights(fixture_tree: tuple[Path, dict[str, Any]]) -> Path:
    """A random-valued stand-in for Keras' ImageNet MobileNetV2 file, in the fixture tree under the real URL's path."""
    return add_to_fixture(fixture_tree[0])


@pytest.fixture
def server(fixture_tree: tuple[Path, dict[str, Any]]) -> FixtureServer:
    with FixtureServer(fixture_tree[0]) as srv:
        yield srv


def stage_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONPATH", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # importing TensorFlow in this process sets it to 1; a user's shell has none
    # The loopback object store's credentials, as a user would export theirs.
    env.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    env.update(extra)
    return env


def write_params(path: Path, **overrides: dict[str, Any]) -> None:
    """The repository's params.yaml with ``overrides`` (section -> {key: value}), written to ``path``."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_repo(dest: Path, overrides: dict[str, dict[str, Any]]) -> Path:
    """A temporary copy of the repository with param overrides, committed."""
    dest.mkdir(parents=True, exist_ok=True)
    return copy_repo(dest, overrides)


def fixture_overrides(server: FixtureServer, manifest: dict[str, Any], **filter_params: Any) -> dict[str, dict[str, Any]]:
    """Params that point the pipeline at the loopback fixture, with fast retries.

    ``unrelabelled_lights: exclude`` keeps the selection the tiny pipeline's figures were measured on
    (28 / 7 images: the replica bound, the learned car, the whole-batch counts); the default,
    ``ignore``, is tested in test_filter.py, test_ignore_regions.py and test_speed.py.
    """
    return {
        "download": {**download_params(server.url, manifest), "backoff_s": 0.01, "retries": 2, "timeout_s": 10},
        "filter": {"images_per_class": "all", "unrelabelled_lights": "exclude", **filter_params},
    }


def run(cmd: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, env=stage_env(**env), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


TINY_MODEL = {
    "download": {"pretrained": "scratch"},
    "train": {"init": "scratch", "epochs": 1, "batch_size": 4},
    "export": {"latency_images": 2, "latency_repeats": 1, "representative_steps": 2},
}


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def set_param(repo: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@dataclass
class PipelineRun:
    """A repo after the tiny pipeline ran end to end, and what each `dvc repro` printed on the way."""

    repo: Path
    outputs: dict[str, str]


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory, fixture_tree) -> PipelineRun:
    """The whole pipeline once on the tiny config, incrementally: data half, no-op, split param change, model half.

    Built once per `pytest` run, also under pytest-xdist (`make test` runs 2 workers): the first
    worker to ask builds it in the folder the workers share, under a file lock; the others wait
    and read it. Tests treat it as read-only and work on copies.
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, above each worker's own
    root, manifest = fixture_tree
    built, record = shared / "tiny_pipeline", shared / "tiny_pipeline.json"
    with FileLock(shared / "tiny_pipeline.lock"):
        if not record.exists():
            shutil.rmtree(built, ignore_errors=True)
            record.write_text(json.dumps(build_tiny_pipeline(root, manifest, built / "repo")))
    return PipelineRun(built / "repo", json.loads(record.read_text()))


@pytest.fixture(scope="module")
def cached_repo(tiny_pipeline: PipelineRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo whose data stages have run once (the session's tiny run, model half removed); tests work on copies."""
    repo = copy_of(tiny_pipeline.repo, tmp_path_factory.mktemp("cached") / "repo")
    for output in ("models/train", "models/train_state", "reports/train", "reports/evaluate", ".dvc/cache/runs"):
        shutil.rmtree(repo / output, ignore_errors=True)
    for output in ("model.tflite", "metadata.json", "labels.txt", "MODEL_CARD.md"):
        (repo / "models" / output).unlink(missing_ok=True)
    (repo / "reports/export.json").unlink(missing_ok=True)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for stage in ("train", "export", "evaluate"):
        del lock["stages"][stage]
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    return repo


def copy_of(repo: Path, dest: Path) -> Path:
    shutil.copytree(repo, dest, symlinks=True)
    return dest


def build_tiny_pipeline(root: Path, manifest: dict[str, Any], repo: Path) -> dict[str, str]:
    outputs = {}
    with FixtureServer(root) as server:
        overrides = fixture_overrides(server, manifest)
        for section, values in TINY_MODEL.items():
            overrides.setdefault(section, {}).update(values)
        make_repo(repo, overrides)
        outputs["data"] = run(["dvc", "repro", "cache"], repo).stdout
        outputs["data_again"] = run(["dvc", "repro", "cache"], repo).stdout
        set_param(repo, "split", "seed", 43)
        outputs["split_changed"] = run(["dvc", "repro", "cache"], repo).stdout
        outputs["model"] = run(["dvc", "repro"], repo).stdout
        outputs["model_again"] = run(["dvc", "repro"], repo).stdout
    return outputs


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    """A real SeaweedFS S3 server on 127.0.0.1 with an empty data dir, for the whole session."""
    with ObjectStore(tmp_path_factory.mktemp("s3")) as store:
        yield store
