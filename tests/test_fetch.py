"""Resumable, verified downloads against the loopback fixture server."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testkit.fixture import ANNOTATIONS_ZIP, CHECKPOINT_TARBALL
from testkit.fixture_server import FixtureServer
from trafficdet.errors import PipelineError
from trafficdet.fetch import CHUNK, HTTPStatusError, RetryPolicy, fetch, rewrite_mirror

FAST = RetryPolicy(retries=2, backoff_s=0.01, timeout_s=10)
BIG = "zips/train2017.zip"  # several chunks long


def md5_of(path: Path) -> str:
    return "md5:" + hashlib.md5(path.read_bytes()).hexdigest()


def test_mirror_rewrites_only_coco_host() -> None:
    assert (
        rewrite_mirror("http://images.cocodataset.org/train2017/1.jpg", "http://127.0.0.1:9/")
        == "http://127.0.0.1:9/train2017/1.jpg"
    )
    assert rewrite_mirror("https://example.org/x.zip", "http://127.0.0.1:9") == "https://example.org/x.zip"
    assert rewrite_mirror("http://images.cocodataset.org/a", "") == "http://images.cocodataset.org/a"


def test_dropped_connection_resumes_with_range(tmp_path: Path, fixture_tree, server: FixtureServer) -> None:
    root, _ = fixture_tree
    assert (root / BIG).stat().st_size > 2 * CHUNK
    server.inject(BIG, f"drop:{CHUNK + 1000}", "status:503")
    dest = fetch(f"{server.url}/{BIG}", tmp_path / "t.zip", checksum=md5_of(root / BIG), policy=FAST)
    assert dest.read_bytes() == (root / BIG).read_bytes()
    assert server.ranges == [(f"/{BIG}", f"bytes={CHUNK}-")]  # the whole chunks received are kept
    assert not (tmp_path / "t.zip.part").exists()


def test_killed_download_resumes(tmp_path: Path, fixture_tree, server: FixtureServer) -> None:
    """SIGKILL a download halfway; the next run asks only for the missing bytes."""
    root, _ = fixture_tree
    server.inject(BIG, f"stall:{2 * CHUNK}")
    dest, part = tmp_path / "t.zip", tmp_path / "t.zip.part"
    code = f"from pathlib import Path; from trafficdet.fetch import fetch; fetch({server.url + '/' + BIG!r}, Path({str(dest)!r}))"
    child = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size >= 2 * CHUNK) and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert part.stat().st_size == 2 * CHUNK and not dest.exists()

    fetch(f"{server.url}/{BIG}", dest, checksum=md5_of(root / BIG), policy=FAST)
    assert dest.read_bytes() == (root / BIG).read_bytes()
    assert server.ranges[-1] == (f"/{BIG}", f"bytes={2 * CHUNK}-")


def test_checksum_mismatch_is_clear_and_leaves_nothing(tmp_path: Path, server: FixtureServer) -> None:
    with pytest.raises(PipelineError, match=r"checksum mismatch: expected md5 0{32}, got [0-9a-f]{32}"):
        fetch(f"{server.url}/{ANNOTATIONS_ZIP}", tmp_path / "a.zip", checksum="md5:" + "0" * 32, policy=FAST)
    assert list(tmp_path.iterdir()) == []


def test_verified_copy_is_not_downloaded_again(tmp_path: Path, fixture_tree, server: FixtureServer) -> None:
    root, _ = fixture_tree
    checksum = md5_of(root / ANNOTATIONS_ZIP)
    fetch(f"{server.url}/{ANNOTATIONS_ZIP}", tmp_path / "a.zip", checksum=checksum, policy=FAST)
    fetch(f"{server.url}/{ANNOTATIONS_ZIP}", tmp_path / "a.zip", checksum=checksum, policy=FAST)
    assert server.hits[f"/{ANNOTATIONS_ZIP}"] == 1


@pytest.mark.parametrize("status", [403, 404])
def test_forbidden_or_missing_names_the_way_out(tmp_path: Path, server: FixtureServer, status: int) -> None:
    server.inject(CHECKPOINT_TARBALL, f"status:{status}")
    with pytest.raises(HTTPStatusError, match=f"HTTP {status}.*checkpoint_url") as info:
        fetch(f"{server.url}/{CHECKPOINT_TARBALL}", tmp_path / "c.tgz", policy=FAST, hint="set download.checkpoint_url")
    assert info.value.status == status
    assert server.hits[f"/{CHECKPOINT_TARBALL}"] == 1  # final statuses are not retried
    assert list(tmp_path.iterdir()) == []


def test_server_errors_are_retried(tmp_path: Path, fixture_tree, server: FixtureServer) -> None:
    server.inject(ANNOTATIONS_ZIP, "status:503", "status:500")
    fetch(f"{server.url}/{ANNOTATIONS_ZIP}", tmp_path / "a.zip", policy=FAST)
    assert server.hits[f"/{ANNOTATIONS_ZIP}"] == 3


def test_no_network_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PipelineError, match=r"cannot reach 127\.0\.0\.1: connection refused after 3 attempts"):
        fetch(f"http://127.0.0.1:{port}/x.zip", tmp_path / "x.zip", policy=FAST)
    assert not (tmp_path / "x.zip").exists()


def test_dns_failure_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # no query leaves the machine
    with pytest.raises(PipelineError, match=r"cannot reach images\.cocodataset\.org: DNS lookup failed"):
        fetch("http://images.cocodataset.org/zips/val2017.zip", tmp_path / "v.zip", policy=FAST)


def test_bad_checksum_param_is_named(tmp_path: Path, server: FixtureServer) -> None:
    with pytest.raises(PipelineError, match="must look like 'md5:<hex>'"):
        fetch(f"{server.url}/{ANNOTATIONS_ZIP}", tmp_path / "a.zip", checksum="crc32:1234", policy=FAST)
