"""Atomic writes: an output is either complete or absent, never half-written."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from trafficdet.errors import PipelineError
from trafficdet.paths import TEMP

_UMASK = os.umask(0)
os.umask(_UMASK)


def read_json(path: Path) -> Any:
    """Parse a JSON file with orjson (several times faster than ``json`` on COCO files)."""
    try:
        return orjson.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found") from None
    except orjson.JSONDecodeError as err:
        raise PipelineError(f"{path}: not valid JSON ({err})") from None


def write_json(path: Path, data: Any, *, indent: bool = False) -> None:
    """Write JSON to a temp file beside ``path`` and rename it into place."""
    option = orjson.OPT_INDENT_2 if indent else 0
    option |= orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    write_bytes(path, orjson.dumps(data, option=option) + (b"\n" if indent else b""))


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Give an OS error raised without a file name (a failed ``write``) the name of the output being written.

    So that "No space left on device" says where: ``run_stage`` prints the name.
    """
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from err
        raise


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` atomically: temp file in the same directory, fsync-free rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with naming(path), os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temps(*outputs: Path) -> None:
    """Delete what a killed run left beside ``outputs``: the ``.<name>.*.tmp`` of atomic writes."""
    for output in map(Path, outputs):
        for stale in output.parent.glob(f".{output.name}.*.tmp") if output.parent.is_dir() else ():
            shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink(missing_ok=True)


def private_tmpdir(parent: Path = TEMP) -> Path:
    """Point ``TMPDIR`` at ``data/.tmp/<pid>/``, removed when the process exits.

    Model Maker makes temp dirs as it imports and builds; they land here instead of the
    user's ``/tmp``. Folders of processes that no longer run (killed runs) are removed first;
    those of live ones are left alone (the workers of a multi-worker run share a repository).
    """
    parent.mkdir(parents=True, exist_ok=True)
    for folder in parent.iterdir():
        if folder.is_dir() and not (folder.name.isdigit() and _alive(int(folder.name))):
            shutil.rmtree(folder, ignore_errors=True)
    mine = (parent / str(os.getpid())).resolve()
    mine.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(mine)
    tempfile.tempdir = None  # re-read TMPDIR
    atexit.register(shutil.rmtree, mine, ignore_errors=True)
    return mine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temp directory that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; outputs get the usual mode
    try:
        with naming(path):
            yield tmp
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
