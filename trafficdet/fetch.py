"""Resumable, verified HTTP downloads.

Written by hand on top of ``requests`` because no maintained library combines what the
pipeline needs in one call: HTTP Range resume of a partial file that survives a killed
process, retries with backoff on both connect and mid-stream failures, checksum
verification, rename-into-place, a deadline per file that a trickling server cannot
stretch, redirects confined to the hosts the params name, and one clear error line per
failure kind. Google Drive links go through ``gdown``, which knows Drive's confirmation pages.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from tqdm import tqdm

from trafficdet.errors import PipelineError
from trafficdet.params import DownloadParams, url_problem

COCO_HOST_PREFIXES = ("http://images.cocodataset.org/", "https://images.cocodataset.org/")
CHUNK = 1 << 16  # small enough that a dropped connection loses little
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
MAX_REDIRECTS = 5
SLOW_HINT = "raise download.timeout_s, or lower download.min_kbytes_per_s, for a slow server"


class HTTPStatusError(PipelineError):
    """The server answered with a final error status (403, 404, ...): retrying will not help."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class RefusedURLError(PipelineError):
    """A URL (or a redirect to one) that is not http(s) or names a host nobody configured."""


class RefusedRedirectError(RefusedURLError):
    """The server redirected where the params do not allow (or too often): its answer, not the URL's fault."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try, and how long to wait, before giving up on one URL."""

    retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 60.0
    min_kbytes_per_s: float = 20.0

    @classmethod
    def from_params(cls, params: DownloadParams) -> RetryPolicy:
        """Build from the ``download:`` section's retries / backoff_s / timeout_s / min_kbytes_per_s."""
        return cls(params.retries, params.backoff_s, params.timeout_s, params.min_kbytes_per_s)

    def deadline_s(self, size: int) -> float:
        """Seconds one response of ``size`` bytes may take: ``timeout_s`` plus its size at the minimum rate."""
        return self.timeout_s + size / (self.min_kbytes_per_s * 1000)


@dataclass(frozen=True)
class HostPolicy:
    """The hosts image bytes may come from: named by the params, never by a downloaded file.

    Hosts are compared by name (any port, http or https): a redirect from http to https on
    the same host is followed, one to another host is refused.
    """

    hosts: frozenset[str]

    @classmethod
    def from_params(cls, params: DownloadParams) -> HostPolicy:
        """The annotations' own host, the mirror's and ``download.allowed_hosts``.

        For COCO 2017 the annotations' own host is also COCO's image host, wherever the
        annotations zip itself was fetched from.
        """
        named = [params.annotations_url, params.mirror] + ([COCO_HOST_PREFIXES[0]] if params.source == "coco2017" else [])
        hosts = {(urlsplit(url).hostname or "").lower() for url in named if url}
        return cls(frozenset(hosts - {""} | {host.lower() for host in params.allowed_hosts}))

    def problem(self, url: str) -> str:
        """Why ``url`` may not be fetched, or "" if it may."""
        return url_problem(url) or (
            ""
            if urlsplit(url).hostname in self.hosts
            else f"host {urlsplit(url).hostname!r} is neither the annotations' host nor the mirror "
            "(add it to download.allowed_hosts to allow it)"
        )


def rewrite_mirror(url: str, mirror: str) -> str:
    """Point an ``images.cocodataset.org`` URL at the same path under ``mirror``."""
    if not mirror:
        return url
    for prefix in COCO_HOST_PREFIXES:
        if url.startswith(prefix):
            return mirror.rstrip("/") + "/" + url[len(prefix) :]
    return url


_thread_state = threading.local()


def thread_session() -> requests.Session:
    """One ``requests.Session`` per thread, so parallel fetches reuse connections."""
    session = getattr(_thread_state, "session", None)
    if session is None:
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=4)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        _thread_state.session = session
    return session


def parse_checksum(checksum: str, where: str) -> tuple[str, str] | None:
    """Split ``"md5:abc…"`` / ``"sha256:…"`` into (algorithm, hex); ``""`` means unpinned."""
    if not checksum:
        return None
    algorithm, _, digest = checksum.partition(":")
    if algorithm not in ("md5", "sha256") or not digest:
        raise PipelineError(f"{where}: checksum {checksum!r} must look like 'md5:<hex>' or 'sha256:<hex>'")
    return algorithm, digest.lower()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _network_reason(err: Exception) -> str:
    text = str(err)
    if "NameResolutionError" in text or "Name or service not known" in text or "getaddrinfo" in text:
        return "DNS lookup failed (no network?)"
    if "Connection refused" in text:
        return "connection refused"
    if isinstance(err, requests.Timeout | urllib3.exceptions.TimeoutError) or "timed out" in text:
        return "timed out"
    return "connection failed"


def _failed_host(err: Exception, url: str) -> str:
    """The host whose connection failed: after a redirect, the one redirected to, not ``url``'s.

    requests attaches the request it was sending (the redirected one, when it follows them).
    """
    request = getattr(err, "request", None)
    parts = urlsplit(getattr(request, "url", None) or url)
    host = parts.hostname or ""
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{parts.port}" if parts.port else shown


def _is_drive(url: str) -> bool:
    try:
        return urlsplit(url).hostname in ("drive.google.com", "docs.google.com", "drive.usercontent.google.com")
    except ValueError:  # malformed: url_problem says why
        return False


def fetch(
    url: str,
    dest: Path,
    *,
    checksum: str = "",
    policy: RetryPolicy = RetryPolicy(),
    partial: Path | None = None,
    progress: bool = True,
    hint: str = "",
    session: requests.Session | None = None,
    hosts: HostPolicy | None = None,
    resumable: bool = True,
    accept: Callable[[Path, str], str] | None = None,
) -> Path:
    """Download ``url`` to ``dest``: resumable, retried, verified, renamed into place.

    ``partial`` is where the incomplete bytes live between attempts and across killed
    runs (default: ``dest`` + ``.part``); it is kept outside DVC outputs by the stages
    so that ``dvc repro`` does not delete it before resuming. ``hint`` is appended to
    403/404 errors to name the param that offers a way out. With ``hosts``, ``url`` and
    every redirect must stay on those hosts (``RefusedURLError`` otherwise); without, redirects
    are followed (for URLs the user wrote into params.yaml). Without ``resumable`` the
    partial file is removed when the download fails (small files: not worth resuming). ``accept``
    judges a complete answer (the file, its Content-Type): a problem it names (an empty body, an
    HTML page) is retried like a dropped connection, and after the last attempt raised.
    """
    problem = hosts.problem(url) if hosts else ("" if _is_drive(url) else url_problem(url))
    if problem:
        raise RefusedURLError(f"download {url}: {problem}")
    dest = Path(dest)
    partial = Path(partial) if partial else dest.with_name(dest.name + ".part")
    partial.parent.mkdir(parents=True, exist_ok=True)
    pinned = parse_checksum(checksum, url)
    if pinned and dest.exists() and file_digest(dest, pinned[0]) == pinned[1]:
        return dest  # verified copy from an earlier run
    if _is_drive(url):
        _fetch_drive(url, partial)
    else:
        try:
            _fetch_http(url, partial, policy, progress, hint, session or thread_session(), hosts, resumable, accept)
        except BaseException:
            if not resumable:
                partial.unlink(missing_ok=True)
            raise
    if pinned:
        algorithm, expected = pinned
        actual = file_digest(partial, algorithm)
        if actual != expected:
            partial.unlink()
            raise PipelineError(
                f"download {url}: checksum mismatch: expected {algorithm} {expected}, got {actual} "
                f"(file deleted; fix the checksum in params.yaml if the source changed)"
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, dest)
    return dest


def _fetch_http(
    url: str,
    partial: Path,
    policy: RetryPolicy,
    progress: bool,
    hint: str,
    session: requests.Session,
    hosts: HostPolicy | None,
    resumable: bool,
    accept: Callable[[Path, str], str] | None = None,
) -> None:
    """Fill ``partial`` with the whole body of ``url``, resuming with Range requests."""
    last_problem = ""
    for attempt in range(policy.retries + 1):
        if attempt:
            time.sleep(policy.backoff_s * 2 ** (attempt - 1))
        have = partial.stat().st_size if partial.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        started = time.monotonic()
        try:
            with _get(session, url, headers, policy, hosts) as response:
                status = response.status_code
                if status == 416 and have:
                    return  # we already hold every byte: a previous run died before renaming
                if status in (401, 403, 404, 410):
                    reason = f"HTTP {status} {response.reason}"
                    raise HTTPStatusError(f"download {url}: {reason}" + (f"; {hint}" if hint else ""), status)
                if status in RETRYABLE_STATUS:
                    last_problem = f"HTTP {status} {response.reason}"
                    continue
                if status not in (200, 206):
                    raise PipelineError(f"download {url}: unexpected HTTP {status} {response.reason}")
                resumed = status == 206
                expected_total = _expected_total(response, have if resumed else 0)
                with (
                    open(partial, "ab" if resumed else "wb", buffering=0) as handle,  # each read on disk: a kill loses none
                    tqdm(
                        total=expected_total,
                        initial=have if resumed else 0,
                        unit="B",
                        unit_scale=True,
                        desc=Path(urlsplit(url).path).name,
                        disable=not progress,
                        leave=False,
                    ) as bar,
                ):
                    expected = expected_total - have if resumed and expected_total else expected_total or 0
                    _copy_body(response, handle, bar.update, started, expected, policy)
                size = partial.stat().st_size
                if expected_total is not None and size < expected_total:
                    last_problem = f"connection dropped at {size} of {expected_total} bytes"
                    continue
                problem = accept(partial, response.headers.get("Content-Type", "")) if accept else ""
                if problem:  # a bad answer, maybe of a bad moment: ask again, from the start
                    partial.unlink()
                    last_problem = problem
                    continue
                return
        except _TooSlowError as slow:
            last_problem = f"timed out ({slow}; {SLOW_HINT})"
        except (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError) as err:
            last_problem = _network_reason(err)
            host = _failed_host(err, url)
            if last_problem == "timed out":
                last_problem = f"timed out (no bytes for {policy.timeout_s:g} s; {SLOW_HINT})"
            elif partial.exists() and partial.stat().st_size > have:
                last_problem = "connection dropped mid-transfer"
            elif last_problem.startswith("DNS") or last_problem == "connection refused":
                last_problem = f"cannot reach {host}: {last_problem}"
        except requests.exceptions.ChunkedEncodingError:
            last_problem = "connection dropped mid-transfer"
        except requests.RequestException as err:  # InvalidURL, InvalidSchema, ...: retrying will not help
            raise RefusedURLError(f"download {url}: {type(err).__name__}: {err}".splitlines()[0]) from None
    again = "rerun when the network and server are back"
    kept = f"partial file kept at {partial}; rerun to resume" if resumable and partial.exists() else again
    attempts = f"{policy.retries + 1} attempt{'s' if policy.retries else ''}"
    raise PipelineError(f"download {url}: {last_problem} after {attempts} ({kept}, or set download.mirror)")


def _get(session: requests.Session, url: str, headers: dict[str, str], policy: RetryPolicy, hosts: HostPolicy | None):
    """GET ``url`` (streamed); with ``hosts``, follow redirects by hand, each checked against them."""
    for _ in range(MAX_REDIRECTS + 1):
        response = session.get(url, headers=headers, stream=True, timeout=policy.timeout_s, allow_redirects=hosts is None)
        if hosts is None or not response.is_redirect:
            return response
        target = urljoin(url, response.headers["Location"])
        response.close()
        problem = hosts.problem(target)
        if problem:
            raise RefusedRedirectError(f"download {url}: redirect to {target} refused: {problem}")
        url = target
    raise RefusedRedirectError(f"download {url}: more than {MAX_REDIRECTS} redirects")


class _TooSlowError(Exception):
    """The response missed its deadline (``RetryPolicy.deadline_s``)."""


def _copy_body(
    response: requests.Response, handle: Any, progress: Any, started: float, expected: int, policy: RetryPolicy
) -> None:
    """Copy the body to ``handle`` by whatever has arrived, checking the deadline after every read.

    Hand-written because a per-read timeout alone lets a server that sends one byte every
    few seconds hold a download forever, and ``iter_content`` waits for full chunks. Each
    read waits at most until the deadline (the socket timeout is lowered to what is left),
    so a trickle ends within ``timeout_s + expected / min_kbytes_per_s`` of the request.
    The deadline grows with the bytes received when the server did not say the size.
    """
    raw = response.raw
    received = 0
    while True:
        deadline = started + policy.deadline_s(max(expected, received))
        left = deadline - time.monotonic()
        if left <= 0:
            size = f" of {expected}" if expected else ""
            raise _TooSlowError(
                f"{received}{size} bytes in {time.monotonic() - started:.1f} s, slower than {policy.min_kbytes_per_s:g} kB/s"
            )
        sock = getattr(raw.connection, "sock", None)
        if sock is not None:
            sock.settimeout(min(policy.timeout_s, left))
        try:
            chunk = raw.read1(CHUNK, decode_content=True)
        except urllib3.exceptions.ReadTimeoutError:
            if time.monotonic() < deadline:
                raise  # no bytes for timeout_s
            continue  # the deadline passed while waiting: reported above
        if not chunk:
            return
        handle.write(chunk)
        received += len(chunk)
        progress(len(chunk))


def _expected_total(response: requests.Response, offset: int) -> int | None:
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def _fetch_drive(url: str, partial: Path) -> None:
    """Google Drive needs its confirm-token dance; gdown does it and resumes too."""
    import gdown  # imported lazily: it is only needed for Drive links

    try:
        result = gdown.download(url, output=str(partial), quiet=False, resume=True, fuzzy=True)
    except Exception as err:  # gdown raises several unrelated types
        raise PipelineError(f"download {url}: Google Drive fetch failed: {err}".splitlines()[0]) from None
    if result is None:
        raise PipelineError(f"download {url}: Google Drive fetch failed (no file returned)")
