"""The image store: ``data/images/`` and its index ``data/images.json``.

The index records, per stored file, the URL its bytes came from and their sha256. A
file is reused only when its bytes still match that record and the URL it would come
from today (annotations + params) is the recorded one; anything else is fetched, linked
or extracted again, decoded once, and only then renamed into the store. Downloaded
annotations are data: their names must be plain file names, their URLs http(s) on a
host the params name, and a ``local_path`` is honoured only for the user's own dataset
(``download.source: coco_folder | voc``) and only inside ``download.source_path``.
A bad record, or a file that is bad in itself (answered in full, it does not decode; the
server says it is not there: 404, 410), is rejected, named by its URL and the reason. Anything
that may be a bad moment of the server or the network (an empty answer, an HTML page, a 5xx
or a timeout after the retries, a refused redirect, a 401/403) stops the stage with one line,
so that ``data/images.json`` never records one: the next ``dvc repro`` asks again. So do the
disk and a broken archive.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image
from tqdm import tqdm

from trafficdet.errors import PipelineError
from trafficdet.fetch import (
    COCO_HOST_PREFIXES,
    HostPolicy,
    HTTPStatusError,
    RefusedRedirectError,
    RefusedURLError,
    RetryPolicy,
    fetch,
    file_digest,
    rewrite_mirror,
)
from trafficdet.io import naming, read_json
from trafficdet.params import DownloadParams

NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems


@dataclass(frozen=True)
class Record:
    """Where a stored file's bytes came from and what they were."""

    url: str  # http(s) URL; "<zip url>!/<member>"; or "file:<path under download.source_path>"
    sha256: str


@dataclass(frozen=True)
class Outcome:
    """What became of one image: kept (with its record) or rejected (with the reason)."""

    reason: str = ""
    record: Record | None = None
    action: str = ""  # reused | fetched | linked | extracted | rejected: printed, never written to an output
    ignored_local_path: bool = False


@dataclass(frozen=True)
class Sources:
    """Where images may come from, as the ``download:`` params say."""

    hosts: HostPolicy
    mirror: str = ""
    own_root: Path | None = None  # download.source_path when download.source is the user's own, else None
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    previous: dict[str, Record] = field(default_factory=dict)  # the index of the last run

    @classmethod
    def from_params(cls, params: DownloadParams, previous: dict[str, Record]) -> Sources:
        own = Path(params.source_path) if params.source in ("coco_folder", "voc") else None
        return cls(HostPolicy.from_params(params), params.mirror, own, RetryPolicy.from_params(params), previous)

    @classmethod
    def for_mirror(cls, mirror: str, policy: RetryPolicy = RetryPolicy(), **kwargs: Any) -> Sources:
        """COCO images through ``mirror`` (tests and benchmarks)."""
        hosts = {"images.cocodataset.org", urlsplit(mirror).hostname or ""} - {""}
        return cls(HostPolicy(frozenset(hosts)), mirror, policy=policy, **kwargs)


def name_problem(name: Any) -> str:
    """Why ``name`` cannot be a file of the store (it must stay inside it), or ""."""
    if not isinstance(name, str):
        return f"file_name is not a string: {name!r:.80}"
    if name in ("", ".", ".."):
        return f"file_name {name!r} is not a file name"
    if "\0" in name:
        return "file_name contains a NUL character"
    if "/" in name or "\\" in name:
        return "file_name contains a path separator"
    if name.startswith("."):
        return "file_name starts with '.' (hidden names are the store's temporary files)"
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        return "file_name is not valid Unicode"
    if size > NAME_MAX:
        return f"file_name is {size} bytes long (at most {NAME_MAX})"
    return ""


def _short(text: str, limit: int = 200) -> str:
    """A reason safe to print on one line: downloaded text can be long or hold newlines."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def origin(image: dict[str, Any], sources: Sources) -> tuple[str, Path | None, str]:
    """(URL to record, local file or None, "") for an image, or ("", None, reason) to reject it."""
    local = image.get("local_path")
    if local is not None and sources.own_root is not None:
        if not isinstance(local, str) or not local or "\0" in local:
            return "", None, f"local_path is not a path: {local!r:.80}"
        root = Path(os.path.abspath(sources.own_root))
        # Lexical check: '..' or an absolute path cannot leave the folder; symlinks the user put in it are followed.
        path = Path(os.path.normpath(root / local))
        if not path.is_relative_to(root) or path == root:
            return "", None, f"local_path {_short(local, 80)!r} is outside download.source_path ({sources.own_root})"
        return "file:" + path.relative_to(root).as_posix(), path, ""
    url = image.get("coco_url")
    if not isinstance(url, str) or not url:
        return (
            "",
            None,
            "no coco_url" + (" (a local_path is honoured only for download.source: coco_folder | voc)" if local else ""),
        )
    url = rewrite_mirror(url, sources.mirror)
    problem = sources.hosts.problem(url)
    return ("", None, f"{_short(url, 120)}: {problem}") if problem else (url, None, "")


NOT_AN_IMAGE = ("text/", "application/json", "application/xml", "application/xhtml")
MISSING_STATUS = (404, 410)  # the server says the file is not there: a property of the URL, counted


def response_problem(path: Path, content_type: str) -> str:
    """Why a complete answer to an image URL is no image at all (retried, then fatal), or "".

    An empty body or an error page says nothing about the image: servers and proxies send them
    at bad moments. A body that claims to be an image and fails to decode is judged later, as a file.
    """
    if path.stat().st_size == 0:
        return "empty response (0 bytes)"
    kind = content_type.split(";")[0].strip().lower()
    if kind.startswith(NOT_AN_IMAGE):
        return f"a {kind} page, not an image"
    with open(path, "rb") as handle:
        if handle.read(64).lstrip().startswith(b"<"):  # no image format starts with '<'
            return "an HTML or XML page, not an image"
    return ""


def verify_image(path: Path, width: int | None, height: int | None) -> str:
    """Decode the whole file once; return "" if usable, else why not (never naming ``path``: a temp file)."""
    try:
        with Image.open(path) as image:
            image.load()
            size, fmt = image.size, image.format
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        text = str(err).splitlines()[0].replace(f" {str(path)!r}", "").replace(str(path), "the file") if str(err) else ""
        return f"corrupt image: {_short(text) if text else type(err).__name__}"
    if fmt != "JPEG":
        return f"{fmt} image: Model Maker's COCO reader decodes JPEG only"
    if width and height and size != (width, height):
        return f"size {size[0]}x{size[1]} differs from annotated {width}x{height}"
    return ""


def reusable(dest: Path, url: str, local: Path | None, record: Record | None) -> bool:
    """Whether the stored file is what ``url`` gave before and still holds those bytes."""
    if record is None or record.url != url or dest.is_symlink() or not dest.is_file():
        return False
    if file_digest(dest) != record.sha256:
        return False
    if local is None:
        return True
    # The user's own file may have been replaced since it was linked here.
    return local.is_file() and (os.path.samefile(dest, local) or file_digest(local) == record.sha256)


def _temp(store: Path, name: str, suffix: str) -> Path:
    """A hidden temp name in the store: never a valid image name, short whatever ``name`` is."""
    return store / f".{hashlib.sha256(name.encode()).hexdigest()[:24]}.{suffix}"


def _clear(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _temps(*paths: Path) -> Iterator[None]:
    """Remove ``paths`` however the block ends: nothing half-written stays in the store."""
    try:
        yield
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


def install(image: dict[str, Any], new: Path, dest: Path, url: str, action: str) -> Outcome:
    """Decode ``new``; if usable, rename it to ``dest`` and record it; else reject it, named by ``url``."""
    reason = verify_image(new, image.get("width"), image.get("height"))
    if reason:
        return Outcome(f"{_short(url, 120)}: {reason}", action="rejected")
    record = Record(url, file_digest(new))
    _clear(dest)
    os.replace(new, dest)
    return Outcome(record=record, action=action)


def materialize_one(image: dict[str, Any], store: Path, sources: Sources) -> Outcome:
    """Make ``store/file_name`` a verified copy of the image, or say why it is rejected."""
    name = image.get("file_name")
    problem = name_problem(name)
    if problem:
        return Outcome(problem, action="rejected")
    ignored = image.get("local_path") is not None and sources.own_root is None
    url, local, problem = origin(image, sources)
    if problem:
        return Outcome(problem, action="rejected", ignored_local_path=ignored)
    dest = store / name
    assert dest.parent == store  # name_problem guarantees it; the store never writes elsewhere
    record = sources.previous.get(name)
    if reusable(dest, url, local, record):
        return Outcome(record=record, action="reused", ignored_local_path=ignored)
    new, part = _temp(store, name, "new"), _temp(store, name, "part")
    with _temps(new, part), naming(dest):
        if local is not None:
            try:
                _place_local(local, new)
            except FileNotFoundError:
                return Outcome(f"missing local file {url.removeprefix('file:')} under download.source_path", action="rejected")
            outcome = install(image, new, dest, url, "linked")
        else:
            try:
                fetch(
                    url,
                    new,
                    policy=sources.policy,
                    partial=part,
                    progress=False,
                    hosts=sources.hosts,
                    resumable=False,
                    accept=response_problem,
                )
            except HTTPStatusError as err:
                if err.status not in MISSING_STATUS:  # 401/403: access, not the file
                    raise
                return Outcome(_short(str(err).removeprefix("download ")), action="rejected", ignored_local_path=ignored)
            except RefusedRedirectError:
                raise  # where the server sends us today, not what the record says
            except RefusedURLError as err:
                return Outcome(_short(str(err).removeprefix("download ")), action="rejected", ignored_local_path=ignored)
            outcome = install(image, new, dest, url, "fetched")
    return Outcome(outcome.reason, outcome.record, outcome.action, ignored)


def _place_local(source: Path, dest: Path) -> None:
    if not source.is_file():
        raise FileNotFoundError(source)
    dest.unlink(missing_ok=True)
    try:
        os.link(source, dest)
    except OSError:  # another file system, or links not allowed: copy instead
        shutil.copyfile(source, dest)


def fetch_per_image(images: list[dict[str, Any]], store: Path, sources: Sources, workers: int) -> dict[str, Outcome]:
    """Materialize every image with ``workers`` threads (each reusing its connections).

    The first error that is not a bad record (network, disk) cancels what has not started
    and is raised once the running fetches end (each within its deadline).
    """
    return _parallel(images, workers, lambda image: materialize_one(image, store, sources), store)


def _parallel(images: list[dict[str, Any]], workers: int, work: Callable[[dict], Outcome], store: Path) -> dict[str, Outcome]:
    store.mkdir(parents=True, exist_ok=True)
    results: dict[str, Outcome] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=len(images), unit="img", desc="images") as bar:
        futures = {pool.submit(work, image): key_of(image) for image in images}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def key_of(image: dict[str, Any]) -> str:
    """The index key of an image: its file name (the filter keeps them unique), whatever its type."""
    name = image.get("file_name")
    return name if isinstance(name, str) else repr(name)


def zip_member(image: dict[str, Any], zips: dict[str, tuple[str, str]]) -> tuple[str, str] | str:
    """(zip folder, member path) holding an image in COCO's image zips, or the reject reason."""
    url = image.get("coco_url")
    if not isinstance(url, str) or not url.startswith(COCO_HOST_PREFIXES):
        return "not a COCO 2017 image (no images.cocodataset.org coco_url): not in the image zips"
    member = urlsplit(url).path.lstrip("/")
    folder = member.split("/")[0]
    if folder not in zips or member.count("/") != 1:
        return f"{member!r} is in neither image zip ({', '.join(sorted(zips))})"
    return folder, member


def fetch_from_zips(
    images: list[dict[str, Any]], store: Path, zips: dict[str, tuple[str, str]], sources: Sources, downloads: Path
) -> dict[str, Outcome]:
    """The reference route: download whole COCO zips (``{folder: (url, checksum)}``), extract what is needed."""
    store.mkdir(parents=True, exist_ok=True)
    results: dict[str, Outcome] = {}
    needed: dict[str, list[tuple[dict[str, Any], str]]] = {}
    for image in images:
        name = image.get("file_name")
        problem = name_problem(name)
        located = problem or zip_member(image, zips)
        if isinstance(located, str):
            results[key_of(image)] = Outcome(located, action="rejected")
            continue
        folder, member = located
        url = f"{zips[folder][0]}!/{member}"
        record = sources.previous.get(name)
        if reusable(store / name, url, None, record):
            results[name] = Outcome(record=record, action="reused")
        else:
            needed.setdefault(folder, []).append((image, url))
    for folder, wanted in sorted(needed.items()):
        zip_url, checksum = zips[folder]
        archive = fetch(zip_url, downloads / Path(urlsplit(zip_url).path).name, checksum=checksum, policy=sources.policy)
        try:
            zf = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, EOFError) as err:
            raise PipelineError(f"{archive}: truncated or corrupt zip archive ({err}); delete it and download again") from None
        with zf:
            for image, url in wanted:
                results[image["file_name"]] = _extract(zf, archive, image, url.split("!/", 1)[1], url, store)
    return results


def _extract(zf: zipfile.ZipFile, archive: Path, image: dict[str, Any], member: str, url: str, store: Path) -> Outcome:
    name = image["file_name"]
    new = _temp(store, name, "new")
    with _temps(new), naming(store / name):
        try:
            with zf.open(member) as src, open(new, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except KeyError:
            return Outcome(f"not found in {archive.name}", action="rejected")
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as err:
            # a bad CRC or deflate stream, an unknown compression method or encryption, in this member
            return Outcome(f"corrupt member {member} in {archive.name} ({_short(str(err), 80)})", action="rejected")
        return install(image, new, store / name, url, "extracted")


def read_index(path: Path) -> dict[str, Record]:
    """The records of the last run's index; none if it is missing or from an older format (all re-fetched)."""
    if not path.is_file():
        return {}
    try:
        files = read_json(path).get("files", {})
        return {name: Record(entry["url"], entry["sha256"]) for name, entry in files.items()}
    except (PipelineError, AttributeError, KeyError, TypeError):
        return {}


def clean_store(store: Path) -> None:
    """Remove what a killed run left in the store: hidden temp files (names never valid for images)."""
    if store.is_dir():
        for stale in store.glob(".*"):
            _clear(stale)


def prune_store(store: Path, keep: set[str]) -> int:
    """Remove files no longer in the set (the store persists across runs)."""
    removed = 0
    for path in store.iterdir():
        if path.name not in keep:
            _clear(path)
            removed += 1
    return removed
