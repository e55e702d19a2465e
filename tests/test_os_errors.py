"""Operating-system errors a user can fix get one line naming the path, the cause and what to do.

The full disk of every stage is in test_reproducible.py (a real tmpfs per stage, where a failed
write without a file name is seen to name its output); here a real read-only file system, and
the mapping of the other causes (the tests run as root, whom permissions do not stop).
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from tests.conftest import fixture_overrides, make_repo
from tests.stage_checks import digests, half_written, one_error_line, stage
from trafficdet.errors import PipelineError, os_error_line, run_stage


def test_a_read_only_file_system_is_one_line(fixture_tree, server, tmp_path: Path) -> None:
    _, manifest = fixture_tree
    repo = make_repo(tmp_path / "repo", fixture_overrides(server, manifest))
    for name in ("download", "filter"):
        assert stage(repo, name).returncode == 0
    clean = digests(repo, outputs=True)
    folder = repo / "data/filtered"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], check=True)
    try:
        outside = digests(repo, outputs=False)
        one_error_line(stage(repo, "filter"), "data/filtered", "Read-only file system", "writable copy")
        assert digests(repo, outputs=False) == outside and half_written(repo) == []
        assert list(folder.iterdir()) == []
    finally:
        subprocess.run(["umount", str(folder)], check=True)
    assert stage(repo, "filter").returncode == 0
    assert digests(repo, outputs=True) == clean


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            PermissionError(errno.EACCES, "Permission denied", "data/x.json"),
            "data/x.json: Permission denied: give your user write access",
        ),
        (
            OSError(errno.EROFS, "Read-only file system", "models/m"),
            "models/m: Read-only file system: the file system is read-only",
        ),
        (
            OSError(errno.EDQUOT, "Disk quota exceeded", "reports/r"),
            "reports/r: Disk quota exceeded: free space within your disk quota",
        ),
        (
            RuntimeError("models/ckpt.data; No space left on device [Op:SaveV2]"),
            "models/ckpt.data; No space left on device [Op:SaveV2]: free",
        ),
    ],
    ids=["EACCES", "EROFS", "EDQUOT", "tensorflow-text"],
)
def test_each_cause_names_what_to_do(error: Exception, expected: str) -> None:
    assert (os_error_line(error) or "").startswith(expected)


def test_a_bug_still_shows_its_traceback() -> None:
    with pytest.raises(ZeroDivisionError):
        run_stage(lambda: 1 / 0)
    with pytest.raises(SystemExit):
        run_stage(lambda: (_ for _ in ()).throw(PipelineError("x")))
