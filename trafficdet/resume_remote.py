"""A durable copy of the train stage's resume state (``train.resume_remote``), so a run survives losing its machine.

After every finished epoch (and when the float phase ends, and when the run completes) the
train stage copies models/train_state here; a train stage that starts with no resumable
local state restores from it. The URL is any fsspec URL or an absolute folder path: a
mounted Google Drive folder, ``s3://bucket/prefix`` (credentials and endpoint from the usual
``AWS_*`` variables or ~/.aws), ``gs://`` (with gcsfs installed).

Layout under the URL:
    LATEST.json             the pointer: the state marker, the snapshot it names and each
                            file's sha256 (and the snapshot before it, as a fallback)
    snapshots/<name>/       one whole copy of models/train_state

A snapshot is uploaded whole under a new name before LATEST.json names it, and LATEST.json
is written last in one piece (one PUT on an object store, a rename in a folder): a reader
sees the previous epoch or the new one, never half of one. Files are checked against their
sha256 on the way back, for stores (a synced Drive) that may show the pointer before the
files; a snapshot that fails the check is skipped for the one before it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from pathlib import Path
from typing import Any

from trafficdet.errors import PipelineError
from trafficdet.io import write_bytes

POINTER = "LATEST.json"
SNAPSHOTS = "snapshots"
KEY = "params.yaml train.resume_remote"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ResumeRemote:
    """The resume state at ``url``: read the pointer, push a snapshot, pull one back."""

    def __init__(self, url: str) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except ImportError as err:  # gs:// without gcsfs, and the like
            package = str(err).split("install ")[-1].split()[0] if "install " in str(err) else "its fsspec package"
            raise PipelineError(
                f"{KEY}: {self.url} needs {package}, which is not installed (not in requirements.lock): "
                f".venv/bin/pip install {package}, or use a mounted folder or s3://"
            ) from None
        except ValueError as err:
            raise PipelineError(f"{KEY}: {self.url}: {err}") from None
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local and not Path(self.root).parent.is_dir():
            raise PipelineError(
                f"{KEY}: {self.url}: its parent folder {Path(self.root).parent} does not exist (is the drive mounted?): "
                "mount it, or name a folder whose parent exists"
            )

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _failed(self, doing: str, err: Exception) -> PipelineError:
        """One line for a store that cannot be read or written (credentials, endpoint, permissions)."""
        if isinstance(err, PermissionError):
            fix = "check its credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or the folder's permissions"
        elif isinstance(err, FileNotFoundError):
            fix = "create the bucket or folder, or fix the URL"
        else:
            fix = "check the URL, the endpoint (AWS_ENDPOINT_URL for an S3-compatible store) and the network"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        return PipelineError(f"{KEY}: {self.url}: cannot {doing} ({type(err).__name__}: {first}): {fix}")

    def check_writable(self) -> None:
        """Write and delete a small file: a store that refuses fails now, not after the first epoch."""
        probe = self._path(f".write-check-{secrets.token_hex(4)}")
        try:
            if self.local:
                Path(self.root).mkdir(exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as err:
            raise self._failed("write there", err) from None

    def pointer(self) -> dict[str, Any] | None:
        """What LATEST.json says, or None when nothing was copied there yet."""
        try:
            self.fs.invalidate_cache()
            return json.loads(self.fs.cat_file(self._path(POINTER)))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return None  # not written by this code (a pointer is written whole): treated as no state
        except Exception as err:
            raise self._failed(f"read {POINTER}", err) from None

    def push(self, state_dir: Path, epochs: int) -> None:
        """Copy ``state_dir`` as a new snapshot, then point LATEST.json at it; drop older snapshots."""
        files = {p.relative_to(state_dir).as_posix(): p for p in sorted(state_dir.rglob("*")) if p.is_file()}
        marker = json.loads((state_dir / "state.json").read_text())
        name = f"{epochs:04d}-{secrets.token_hex(4)}"  # a new name each time: never written over while read
        previous = self.pointer()
        for relative, path in files.items():
            target = self._path(SNAPSHOTS, name, relative)
            if self.local:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            self.fs.put_file(str(path), target)
        snapshot = {"snapshot": name, "epochs": epochs, "files": {relative: sha256(p) for relative, p in files.items()}}
        if previous and previous.get("fingerprint") == marker.get("fingerprint") and not marker.get("complete"):
            snapshot["previous"] = {key: previous[key] for key in ("snapshot", "epochs", "files") if key in previous}
        data = json.dumps({**marker, **snapshot}, indent=2).encode()
        if self.local:
            write_bytes(Path(self._path(POINTER)), data)  # temp file + rename
        else:
            self.fs.pipe_file(self._path(POINTER), data)  # one PUT: the old object or the new one
        keep = {name, snapshot.get("previous", {}).get("snapshot")}
        self.fs.invalidate_cache()
        listed = self.fs.ls(self._path(SNAPSHOTS), detail=False) if self.fs.exists(self._path(SNAPSHOTS)) else []
        for old in listed:
            if old.rstrip("/").rsplit("/", 1)[-1] not in keep:
                self.fs.rm(old, recursive=True)

    def pull(self, pointer: dict[str, Any], dest: Path) -> int | None:
        """Download the newest intact snapshot ``pointer`` names into ``dest`` (replaced whole); return its epochs,
        or None if no snapshot it names is intact."""
        for snapshot in (pointer, pointer.get("previous")):
            if not snapshot:
                continue
            tmp = dest.parent / f".{dest.name}.pull.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                for relative, digest in snapshot["files"].items():
                    target = tmp / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self.fs.get_file(self._path(SNAPSHOTS, snapshot["snapshot"], relative), str(target))
                    if sha256(target) != digest:
                        raise FileNotFoundError(relative)
            except FileNotFoundError:
                shutil.rmtree(tmp, ignore_errors=True)
                continue
            except Exception as err:
                shutil.rmtree(tmp, ignore_errors=True)
                raise self._failed(f"read snapshot {snapshot['snapshot']}", err) from None
            shutil.rmtree(dest, ignore_errors=True)
            tmp.replace(dest)
            return int(snapshot["epochs"])
        return None


def make_push_callback(remote: ResumeRemote, state_dir: Path) -> Any:
    """A Keras callback that pushes ``state_dir`` after each epoch (after BackupAndRestore, listed after it, saved it).

    A failed copy costs durability, not the run: one warning line, and the next epoch tries again.
    """
    import tensorflow as tf

    class PushState(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            push_or_warn(remote, state_dir, epoch + 1)

    return PushState()


def push_or_warn(remote: ResumeRemote, state_dir: Path, epochs: int) -> None:
    try:
        remote.push(state_dir, epochs)
    except Exception as err:
        line = (str(err).strip().splitlines() or [""])[0][:200]
        print(
            f"\ntrain: warning: could not copy the resume state to {remote.url} ({type(err).__name__}: {line}); "
            "the next epoch tries again",
            flush=True,
        )
