"""A throwaway copy of this repository (its git-visible files), for tests and the demo."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_STATE = ("dvc.lock", "data/", "models/", "reports/")


def copy_repo(dest: Path, overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """Copy tracked and untracked-but-not-ignored files (no pipeline state) into a new git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        keep = name == "data/own/README.md" or not name.startswith(PIPELINE_STATE)
        if source.is_file() and keep:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    if overrides:
        params = yaml.safe_load((dest / "params.yaml").read_text())
        for section, values in overrides.items():
            params[section].update(values)
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    commit_all(dest, "copy of the traffic-detector repo")
    return dest


def commit_all(repo: Path, message: str) -> None:
    """``git add -A`` and commit, with a fixed identity (temp repos have no user config)."""
    git = ["git", "-c", "user.name=trafficdet", "-c", "user.email=trafficdet@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", message], cwd=repo, check=True)
