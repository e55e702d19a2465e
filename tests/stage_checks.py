"""What every failing or rejecting stage run must show: one line, nothing outside its folders, nothing half-written."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run

OUTPUT_ROOTS = ("data", "models", "reports")
# Kept on purpose, not outputs: archives and their partial downloads, so that a rerun resumes.
RESUMABLE = "data/.downloads"
TEMP = "data/.tmp"  # per-process temp folders, each removed when its process ends


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


# The native libraries' routine log lines, by their own words: none may reach a healthy run's terminal.
NATIVE_NOISE = (
    "GPU suport is not available",
    "absl::InitializeLog()",
    "Created TensorFlow Lite XNNPACK delegate",
    "Feedback manager requires a model with a single signature",
    "Summary on the non-converted ops",
    "arith.constant",
)


def native_noise(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are routine native log lines: the known ones, or any absl/glog INFO or WARNING line."""
    return [
        line
        for line in stderr.splitlines()
        if any(words in line for words in NATIVE_NOISE) or re.match(r"[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\]", line)
    ]


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
            if relative.startswith(RESUMABLE) or relative == TEMP:
                continue
            if relative.startswith(TEMP + "/"):  # a temp folder of a process that is gone
                left.append(relative)
                continue
            if path.name.endswith((".tmp", ".part", ".new")) or (path.parent.name == "images" and path.name.startswith(".")):
                left.append(relative)
    return left


@contextlib.contextmanager
def full_disk(folder: Path, leave_out: tuple[str, ...] = ()) -> Iterator[None]:
    """A real full disk at ``folder``: a tmpfs mounted over it, holding a copy of its files and not a page more.

    ``leave_out`` names files not copied in (so that the stage has to write them again).
    Needs root (tests and CI run as root). Unmounted however the block ends; the files
    that were there before reappear unchanged.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="full-disk.") as saved:
        shutil.copytree(folder, saved, symlinks=True, dirs_exist_ok=True, ignore=lambda _, names: set(leave_out) & set(names))
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(folder)], check=True)
        try:
            shutil.copytree(saved, folder, symlinks=True, dirs_exist_ok=True)
            stats = os.statvfs(folder)
            used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
            size = max(used, stats.f_frsize)  # tmpfs sizes are whole pages, at least one
            subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)
            assert os.statvfs(folder).f_bavail <= 1
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=True)
