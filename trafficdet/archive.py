"""Safe archive extraction: nothing lands outside the target, truncation is a clear error."""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from trafficdet.errors import PipelineError
from trafficdet.io import atomic_dir

zlib_error = zlib.error


def _check_member_name(archive: Path, name: str) -> None:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and pure.parts[0].endswith(":")):
        raise PipelineError(f"{archive}: unsafe path {name!r} in archive (absolute or '..'); refusing to extract")


def extract_zip(archive: Path, target: Path, rename: Callable[[str], str | None] = lambda name: name) -> list[str]:
    """Extract zip members into ``target`` (replaced atomically) under ``rename(name)``.

    ``rename`` returns the member's path inside ``target``, or None to skip it.
    Rejects absolute paths, ``..`` and symlink members rather than silently rewriting
    them, and turns a truncated or corrupt archive into one clear error.
    """
    extracted: list[str] = []
    try:
        with zipfile.ZipFile(archive) as zf, atomic_dir(target) as tmp:
            for info in zf.infolist():
                _check_member_name(archive, info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise PipelineError(f"{archive}: member {info.filename!r} is a symlink; refusing to extract")
                out_name = None if info.is_dir() else rename(info.filename)
                if out_name is None:
                    continue
                out = tmp / out_name
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                extracted.append(out_name)
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile, zlib_error, NotImplementedError, RuntimeError) as err:
        # a bad CRC (BadZipFile) or deflate stream (zlib.error), an unknown method or encryption
        raise PipelineError(f"{archive}: truncated or corrupt zip archive ({err}); delete it and download again") from None
    return extracted


def extract_tar(archive: Path, target: Path) -> list[str]:
    """Extract a tar(.gz) into ``target`` with Python's ``data`` filter (no escapes, no device files)."""
    try:
        with tarfile.open(archive) as tf, atomic_dir(target) as tmp:
            members = tf.getmembers()
            for member in members:
                _check_member_name(archive, member.name)
            try:
                tf.extractall(tmp, members=members, filter="data")
            except tarfile.FilterError as err:
                raise PipelineError(f"{archive}: unsafe member in archive ({err}); refusing to extract") from None
            return [m.name for m in members if m.isfile()]
    except (tarfile.ReadError, EOFError, zlib_error) as err:
        raise PipelineError(f"{archive}: truncated or corrupt tar archive ({err}); delete it and download again") from None
