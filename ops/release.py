"""Tag a release: a git tag whose dvc.lock pins every input and output, all on the remote.

    python -m ops.release 1.2.0        # or: make release VERSION=1.2.0

Refuses unless the work tree is committed, `dvc status` finds nothing to reproduce (so
dvc.lock describes exactly what is in the workspace) and `dvc status --cloud` finds
everything pushed (so anyone can `dvc pull` it). The tag, ``traffic-detector@v1.2.0``,
is the model-registry (GTO) form that `dvc artifacts get <repo> traffic-detector --rev
v1.2.0` resolves.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

from trafficdet.errors import PipelineError, run_stage

ARTIFACT = "traffic-detector"
VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def _run(cmd: list[str], cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or [f"exit {result.returncode}"]
        raise PipelineError(f"{' '.join(cmd)} failed: {lines[-1]}")
    return result.stdout


def release(version: str, repo: Path = Path("."), remote: str | None = None) -> str:
    """Check that the commit is reproducible and pushed, then tag it; return the tag."""
    if not VERSION.match(version):
        raise PipelineError(f"release version {version!r}: use MAJOR.MINOR.PATCH, e.g. 1.2.0")
    tag = f"{ARTIFACT}@v{version}"
    if _run(["git", "tag", "--list", tag], repo).strip():
        raise PipelineError(f"release {tag}: the tag exists already")
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], repo).strip()
    if dirty:
        raise PipelineError(f"release {tag}: commit your changes first ({len(dirty.splitlines())} modified files)")
    status = _run(["dvc", "status"], repo)
    if "up to date" not in status:
        raise PipelineError(f"release {tag}: dvc.lock does not match the workspace; run `dvc repro` and commit")
    cloud = _run(["dvc", "status", "--cloud", *(["-r", remote] if remote else [])], repo)
    if "in sync" not in cloud:
        raise PipelineError(f"release {tag}: not everything is on the remote; run `dvc push` first")
    _run(["git", "tag", "-a", tag, "-m", f"Release {tag}"], repo)
    return tag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", help="MAJOR.MINOR.PATCH")
    parser.add_argument("-r", "--remote", default=None, help="remote to check (default: the repo's default)")
    args = parser.parse_args()
    tag = release(args.version, Path("."), args.remote)
    print(f"release: tagged {tag}; share it with `git push origin {tag}`")


if __name__ == "__main__":
    run_stage(main)
