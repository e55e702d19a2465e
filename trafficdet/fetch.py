"""Resumable, verified HTTP downloads.

Written by hand on top of ``requests`` because no maintained library combines what the
pipeline needs in one call: HTTP Range resume of a partial file that survives a killed
process, retries with backoff on both connect and mid-stream failures, checksum
verification, rename-into-place, and one clear error line per failure kind.
Google Drive links go through ``gdown``, which knows Drive's confirmation pages.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
from tqdm import tqdm

from trafficdet.errors import PipelineError
from trafficdet.params import DownloadParams

COCO_HOST_PREFIXES = ("http://images.cocodataset.org/", "https://images.cocodataset.org/")
CHUNK = 1 << 16  # small enough that a dropped connection loses little
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class HTTPStatusError(PipelineError):
    """The server answered with a final error status (403, 404, ...): retrying will not help."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before giving up on one URL."""

    retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 60.0

    @classmethod
    def from_params(cls, params: DownloadParams) -> RetryPolicy:
        """Build from the ``download:`` section's retries / backoff_s / timeout_s."""
        return cls(params.retries, params.backoff_s, params.timeout_s)


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
    if isinstance(err, requests.Timeout):
        return "timed out"
    return "connection failed"


def _is_drive(url: str) -> bool:
    return urlsplit(url).hostname in ("drive.google.com", "docs.google.com", "drive.usercontent.google.com")


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
) -> Path:
    """Download ``url`` to ``dest``: resumable, retried, verified, renamed into place.

    ``partial`` is where the incomplete bytes live between attempts and across killed
    runs (default: ``dest`` + ``.part``); it is kept outside DVC outputs by the stages
    so that ``dvc repro`` does not delete it before resuming. ``hint`` is appended to
    403/404 errors to name the param that offers a way out.
    """
    dest = Path(dest)
    partial = Path(partial) if partial else dest.with_name(dest.name + ".part")
    partial.parent.mkdir(parents=True, exist_ok=True)
    pinned = parse_checksum(checksum, url)
    if pinned and dest.exists() and file_digest(dest, pinned[0]) == pinned[1]:
        return dest  # verified copy from an earlier run
    if _is_drive(url):
        _fetch_drive(url, partial)
    else:
        _fetch_http(url, partial, policy, progress, hint, session or thread_session())
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


def _fetch_http(url: str, partial: Path, policy: RetryPolicy, progress: bool, hint: str, session: requests.Session) -> None:
    """Fill ``partial`` with the whole body of ``url``, resuming with Range requests."""
    last_problem = ""
    for attempt in range(policy.retries + 1):
        if attempt:
            time.sleep(policy.backoff_s * 2 ** (attempt - 1))
        have = partial.stat().st_size if partial.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with session.get(url, headers=headers, stream=True, timeout=policy.timeout_s) as response:
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
                    open(partial, "ab" if resumed else "wb") as handle,
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
                    for chunk in response.iter_content(CHUNK):
                        handle.write(chunk)
                        bar.update(len(chunk))
                size = partial.stat().st_size
                if expected_total is not None and size < expected_total:
                    last_problem = f"connection dropped at {size} of {expected_total} bytes"
                    continue
                return
        except (requests.ConnectionError, requests.Timeout) as err:
            last_problem = _network_reason(err)
            host = urlsplit(url).hostname
            if partial.exists() and partial.stat().st_size > have:
                last_problem = "connection dropped mid-transfer"
            elif last_problem.startswith("DNS") or last_problem == "connection refused":
                last_problem = f"cannot reach {host}: {last_problem}"
        except requests.exceptions.ChunkedEncodingError:
            last_problem = "connection dropped mid-transfer"
    kept = f"partial file kept at {partial}; rerun to resume" if partial.exists() else "rerun when the network is back"
    raise PipelineError(f"download {url}: {last_problem} after {policy.retries + 1} attempts ({kept}, or set download.mirror)")


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
