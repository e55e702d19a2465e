"""Shared test fixtures: the synthetic source tree, its loopback server, temp repo copies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from trafficdet.fixture import download_params, generate
from trafficdet.fixture_server import FixtureServer

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def fixture_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """40 synthetic scenes, with bad boxes and one truncated JPEG, in the real sources' layout."""
    root = tmp_path_factory.mktemp("fixture")
    return root, generate(root, images=40, seed=0, bad_boxes=True, corrupt_images=1)


@pytest.fixture
def server(fixture_tree: tuple[Path, dict[str, Any]]) -> FixtureServer:
    with FixtureServer(fixture_tree[0]) as srv:
        yield srv


def stage_env() -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONPATH", None)
    return env


def make_repo(dest: Path, overrides: dict[str, dict[str, Any]]) -> Path:
    """Copy the repository's git-visible files into ``dest``, apply param overrides, commit."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        pipeline_state = name == "dvc.lock" or name.startswith(("data/", "models/", "reports/"))
        if source.is_file() and (not pipeline_state or name == "data/own/README.md"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "test repo"], cwd=dest, check=True)
    return dest


def fixture_overrides(server: FixtureServer, manifest: dict[str, Any], **filter_params: Any) -> dict[str, dict[str, Any]]:
    """Params that point the pipeline at the loopback fixture, with fast retries."""
    return {
        "download": {**download_params(server.url, manifest), "backoff_s": 0.01, "retries": 2, "timeout_s": 10},
        "filter": {"images_per_class": "all", **filter_params},
    }


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, env=stage_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
