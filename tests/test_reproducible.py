"""Same inputs, same bytes: every stage forced again finds every md5 in dvc.lock unchanged.

One pass over a copy of the session's tiny pipeline, in another folder (so a path written
into an output would show), stage by stage from download to evaluate:
  1. a real full disk (a tmpfs mounted over the folder the stage writes, full to the byte):
     the stage must fail with one line naming the path and what to do, and leave every
     output byte as it was;
  2. for the cache stage, a run killed (SIGKILL) halfway, which leaves its temp folders;
  3. ``dvc repro -f -s <stage>``: the good run that must recover, byte for byte.
The tests below read what the pass recorded. Train and export run under the CPU
determinism the project already has (seeded, op determinism): training again gives the
same checkpoint bytes (models/train's md5), so no other test trains twice to check it. The
measurements of the machine under reports/timing/ are the only outputs allowed to differ.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from testkit.fixture_server import FixtureServer
from tests.conftest import PipelineRun, run, stage_env
from tests.stage_checks import digests, full_disk, half_written, one_error_line, stage

STAGES = ("download", "filter", "images", "split", "cache", "train", "export", "evaluate")
# Where each stage's disk is made full: the folder it writes first (atomic writes go to a temp
# sibling, so the folder holding the output). Export and evaluate write only at their end: their
# full disk costs a whole run each (Model Maker's SavedModel export traces the graph for a minute
# before its first byte, so filling its temp folder instead would save nothing).
WRITES = {
    "download": "data/raw",
    "filter": "data/filtered",
    "images": "data/images",
    "split": "data",
    "cache": "data/cache",
    "train": "models",
    "export": "models",
    "evaluate": "reports",
}
RESUME_STATE = "models/train_state/"  # persist: a failed train keeps what lets the next run resume
TIMING = "reports/timing/"


@dataclass
class Pass:
    repo: Path
    lock_before: dict
    lock_after: dict = field(default_factory=dict)
    full_disk: dict[str, tuple[subprocess.CompletedProcess[str], list[str], list[str]]] = field(default_factory=dict)
    killed_leftovers: list[str] = field(default_factory=list)
    temp_after: dict[str, list[str]] = field(default_factory=dict)
    cache_after: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def lock_md5s(lock: dict) -> dict[tuple[str, str], str]:
    """(stage, path) -> md5 of every dep and out in a dvc.lock."""
    return {
        (name, item["path"]): item.get("md5", "")
        for name, entry in lock["stages"].items()
        for kind in ("deps", "outs")
        for item in entry.get(kind, [])
    }


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def kill_midway(repo: Path) -> list[str]:
    """Start the cache stage, SIGKILL it once its temp folder exists; return what it left behind."""
    child = subprocess.Popen(
        [sys.executable, "-m", "stages.cache"], cwd=repo, env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        if any(p.name.startswith(".train.") for p in (repo / "data/cache").iterdir()):
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    left = [f"data/cache/{name}" for name in listing(repo / "data/cache") if name.endswith(".tmp")]
    return left + [f"data/.tmp/{name}" for name in listing(repo / "data/.tmp")]


@pytest.fixture(scope="module")
def forced(tiny_pipeline: PipelineRun, fixture_tree, tmp_path_factory: pytest.TempPathFactory) -> Pass:
    repo = tmp_path_factory.mktemp("elsewhere") / "another-name"
    shutil.copytree(tiny_pipeline.repo, repo, symlinks=True)
    record = Pass(repo, yaml.safe_load((repo / "dvc.lock").read_text()))
    mirror = yaml.safe_load((repo / "params.yaml").read_text())["download"]["mirror"]
    with FixtureServer(fixture_tree[0], port=urlsplit(mirror).port):  # the lock's URLs: the same port again
        for name in STAGES:
            started = time.monotonic()
            folder = repo / WRITES[name]
            before = digests(repo, outputs=True)
            # The image store must fetch one image again: the others are reused and need no space.
            leave_out = (min(p.name for p in folder.glob("*.jpg")),) if name == "images" else ()
            with full_disk(folder, leave_out):
                inside, outside = digests(repo, outputs=True), digests(repo, outputs=False)
                result = stage(repo, name)
                after = digests(repo, outputs=True)
                changed = sorted(
                    p for p in set(inside) | set(after) if inside.get(p) != after.get(p) and not p.startswith(RESUME_STATE)
                )
                changed += ["(outside data/ models/ reports/)"] if digests(repo, outputs=False) != outside else []
                record.full_disk[name] = (result, half_written(repo), changed)
            assert digests(repo, outputs=True) == before, f"{name}: unmounting did not restore the outputs"
            if name == "cache":
                record.killed_leftovers = kill_midway(repo)
            run(["dvc", "repro", "-f", "-s", name], repo)
            record.temp_after[name] = listing(repo / "data/.tmp")
            if name == "cache":
                record.cache_after = listing(repo / "data/cache")
            record.seconds[name] = round(time.monotonic() - started, 1)
    record.lock_after = yaml.safe_load((repo / "dvc.lock").read_text())
    print(f"\nforced pass, seconds per stage (full disk + forced run): {record.seconds}")
    return record


@pytest.mark.slow
def test_forcing_every_stage_again_changes_no_md5(forced: Pass) -> None:
    before, after = lock_md5s(forced.lock_before), lock_md5s(forced.lock_after)
    assert before.keys() == after.keys() and {name for name, _ in before} == set(STAGES)
    timing = {key for key in before if key[1].startswith(TIMING)}
    declared = {
        (name, next(iter(out)) if isinstance(out, dict) else out)
        for name, entry in yaml.safe_load((forced.repo / "dvc.yaml").read_text())["stages"].items()
        for kind in ("outs", "metrics", "plots")
        for out in entry.get(kind, [])
    }
    # The exceptions are exactly the measurements of the machine that dvc.yaml declares under reports/timing/.
    assert timing == {key for key in declared if key[1].startswith(TIMING)}
    assert timing == {
        ("train", "reports/timing/train/metrics.json"),
        ("train", "reports/timing/train/plots/metrics"),
        ("export", "reports/timing/export.json"),
    }
    changed = {key: (before[key], after[key]) for key in before if key not in timing and before[key] != after[key]}
    assert changed == {}


@pytest.mark.slow
@pytest.mark.parametrize("name", STAGES)
def test_a_full_disk_is_one_line_and_writes_nothing(forced: Pass, name: str) -> None:
    result, left, changed = forced.full_disk[name]
    line = one_error_line(result, "No space left on device", "free space on that disk")
    assert WRITES[name] in line, line  # names where
    assert left == [], left  # no temp file of an atomic write, no partial image
    assert changed == [], changed  # every output as it was, and nothing written elsewhere


@pytest.mark.slow
def test_killed_and_finished_runs_leave_no_temp_folders(forced: Pass) -> None:
    assert any(path.startswith("data/cache/.train.") for path in forced.killed_leftovers), forced.killed_leftovers
    assert any(path.startswith("data/.tmp/") for path in forced.killed_leftovers), forced.killed_leftovers
    assert forced.cache_after == [".gitignore", "train", "val"]  # the killed run's temp folder is gone
    assert forced.temp_after == {name: [] for name in STAGES}  # nothing piles up in data/.tmp
    assert os.listdir(forced.repo / "data/images")  # (the store is still there)
