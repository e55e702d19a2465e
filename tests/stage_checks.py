"""What every failing or rejecting stage run must show: one line, nothing outside its folders, nothing half-written."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from tests.conftest import run

OUTPUT_ROOTS = ("data", "models", "reports")
# Kept on purpose, not outputs: archives and their partial downloads, so that a rerun resumes.
RESUMABLE = "data/.downloads"


def stage(repo: Path, name: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m stages.<name>`` in ``repo``, as dvc.yaml runs it (no .pyc written into the repo)."""
    return run([sys.executable, "-m", f"stages.{name}"], repo, check=False, PYTHONDONTWRITEBYTECODE="1", **env)


def one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The failure is exit 1 and exactly one ``error:`` line holding ``needles``, with no traceback."""
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def digests(root: Path, *, outputs: bool) -> dict[str, str]:
    """sha256 of every file under ``root``: inside the output folders, or everywhere else (``outputs=False``)."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] == ".git" or path.is_dir():
            continue
        if (relative.parts[0] in OUTPUT_ROOTS) == outputs:
            found[relative.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "link"
    return found


def half_written(root: Path) -> list[str]:
    """Temp files of atomic writes and of the image store that a failed run left in the output folders."""
    left = []
    for top in OUTPUT_ROOTS:
        for path in (root / top).rglob("*") if (root / top).is_dir() else ():
            relative = path.relative_to(root).as_posix()
            if relative.startswith(RESUMABLE):
                continue
            if path.name.endswith((".tmp", ".part", ".new")) or (path.parent.name == "images" and path.name.startswith(".")):
                left.append(relative)
    return left
