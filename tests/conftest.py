"""Shared test fixtures: the synthetic source tree, its loopback server, temp repo copies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trafficdet.fixture import download_params, generate
from trafficdet.fixture_server import FixtureServer
from trafficdet.repo_copy import copy_repo

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
    """A temporary copy of the repository with param overrides, committed."""
    dest.mkdir(parents=True, exist_ok=True)
    return copy_repo(dest, overrides)


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
