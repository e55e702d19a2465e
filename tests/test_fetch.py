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
import yaml

from testkit.fixture import ANNOTATIONS_ZIP, CHECKPOINT_TARBALL
from testkit.fixture_server import FixtureServer
from testkit.repo_copy import ROOT
from trafficdet.errors import PipelineError
from trafficdet.fetch import CHUNK, HostPolicy, HTTPStatusError, RefusedURLError, RetryPolicy, fetch, rewrite_mirror
from trafficdet.params import DownloadParams

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
    assert server.ranges == [(f"/{BIG}", f"bytes={CHUNK + 1000}-")]  # every byte received is kept
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
    with pytest.raises(PipelineError, match=rf"cannot reach 127\.0\.0\.1:{port}: connection refused after 3 attempts"):
        fetch(f"http://127.0.0.1:{port}/x.zip", tmp_path / "x.zip", policy=FAST)
    assert not (tmp_path / "x.zip").exists()


@pytest.mark.parametrize("hosts", [None, HostPolicy(frozenset({"127.0.0.1", "127.0.0.2"}))], ids=["followed", "checked"])
def test_after_a_redirect_the_error_names_the_host_that_failed(tmp_path: Path, server: FixtureServer, hosts) -> None:
    with socket.socket() as probe:  # a port nobody listens on, on another loopback address
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    server.inject(ANNOTATIONS_ZIP, *[f"redirect:http://127.0.0.2:{port}/a.zip"] * 3)
    with pytest.raises(PipelineError) as raised:
        fetch(f"{server.url}/{ANNOTATIONS_ZIP}", tmp_path / "a.zip", policy=FAST, hosts=hosts)
    assert f"cannot reach 127.0.0.2:{port}: connection refused" in str(raised.value)
    assert str(raised.value).startswith(f"download {server.url}/{ANNOTATIONS_ZIP}: ")  # the URL asked for, then who failed


def test_dns_failure_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # no query leaves the machine
    with pytest.raises(PipelineError, match=r"cannot reach images\.cocodataset\.org: DNS lookup failed"):
        fetch("http://images.cocodataset.org/zips/val2017.zip", tmp_path / "v.zip", policy=FAST)


def test_bad_checksum_param_is_named(tmp_path: Path, server: FixtureServer) -> None:
    with pytest.raises(PipelineError, match="must look like 'md5:<hex>'"):
        fetch(f"{server.url}/{ANNOTATIONS_ZIP}", tmp_path / "a.zip", checksum="crc32:1234", policy=FAST)


def test_a_trickling_server_times_out_within_the_deadline(tmp_path: Path, fixture_tree, server: FixtureServer) -> None:
    """One byte every half second: each read returns in time, so only a deadline per file ends it."""
    root, _ = fixture_tree
    size = (root / ANNOTATIONS_ZIP).stat().st_size
    policy = RetryPolicy(retries=1, backoff_s=0.01, timeout_s=1, min_kbytes_per_s=size / 1000)  # deadline: 1 s + 1 s
    server.inject(ANNOTATIONS_ZIP, "trickle:1:0.5", "trickle:1:0.5")
    started = time.monotonic()
    with pytest.raises(PipelineError) as info:
        fetch(f"{server.url}/{ANNOTATIONS_ZIP}", tmp_path / "a.zip", policy=policy, progress=False)
    elapsed = time.monotonic() - started
    bound = (policy.retries + 1) * policy.deadline_s(size) + policy.backoff_s
    assert elapsed < bound + 1.0, f"{elapsed:.1f} s, deadline {bound:.1f} s"  # 1 s of slack for thread start-up
    message = str(info.value)
    assert message.startswith(f"download {server.url}/{ANNOTATIONS_ZIP}: timed out")
    assert "download.timeout_s" in message and "download.min_kbytes_per_s" in message
    assert not (tmp_path / "a.zip").exists()


def test_a_stall_is_reported_as_a_timeout(tmp_path: Path, server: FixtureServer) -> None:
    server.inject(ANNOTATIONS_ZIP, "stall:100")
    policy = RetryPolicy(retries=0, timeout_s=0.5)
    with pytest.raises(PipelineError, match=r"timed out \(no bytes for 0\.5 s; raise download\.timeout_s"):
        fetch(f"{server.url}/{ANNOTATIONS_ZIP}", tmp_path / "a.zip", policy=policy, progress=False)


def test_redirects_stay_on_the_hosts_the_params_name(tmp_path: Path, fixture_tree, server: FixtureServer) -> None:
    root, _ = fixture_tree
    with FixtureServer(root, host="127.0.0.2") as other:
        server.inject(ANNOTATIONS_ZIP, f"redirect:{other.url}/{ANNOTATIONS_ZIP}")
        with pytest.raises(RefusedURLError, match=r"redirect to http://127\.0\.0\.2:\d+/\S+ refused: host '127\.0\.0\.2'"):
            fetch(f"{server.url}/{ANNOTATIONS_ZIP}", tmp_path / "a.zip", policy=FAST, hosts=HostPolicy(frozenset({"127.0.0.1"})))
        assert sum(other.hits.values()) == 0 and list(tmp_path.iterdir()) == []

        server.inject(ANNOTATIONS_ZIP, f"redirect:/{ANNOTATIONS_ZIP}")  # same host: followed
        fetch(f"{server.url}/{ANNOTATIONS_ZIP}", tmp_path / "a.zip", policy=FAST, hosts=HostPolicy(frozenset({"127.0.0.1"})))
        server.inject(ANNOTATIONS_ZIP, f"redirect:{other.url}/{ANNOTATIONS_ZIP}")  # allowed: followed
        both = HostPolicy(frozenset({"127.0.0.1", "127.0.0.2"}))
        fetch(f"{server.url}/{ANNOTATIONS_ZIP}", tmp_path / "b.zip", policy=FAST, hosts=both)
        assert other.hits[f"/{ANNOTATIONS_ZIP}"] == 1


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "http://", "http://127.0.0.1:99999/x", "127.0.0.1/x"])
def test_only_http_urls_are_fetched(tmp_path: Path, url: str) -> None:
    with pytest.raises(RefusedURLError, match=r"scheme|without a host|malformed"):
        fetch(url, tmp_path / "x", policy=FAST)
    assert list(tmp_path.iterdir()) == []


def test_image_hosts_are_those_the_params_name() -> None:
    base = DownloadParams.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text())["download"])
    assert HostPolicy.from_params(base).hosts == {"images.cocodataset.org"}
    mirrored = base.model_copy(update={"mirror": "http://127.0.0.1:8000", "allowed_hosts": ["Cdn.Example.org"]})
    assert HostPolicy.from_params(mirrored).hosts == {"images.cocodataset.org", "127.0.0.1", "cdn.example.org"}
    own = base.model_copy(update={"source": "coco_folder", "annotations_url": "https://data.example.org/a.zip"})
    assert HostPolicy.from_params(own).hosts == {"data.example.org"}
    assert HostPolicy.from_params(mirrored).problem("http://127.0.0.1:9/x.jpg") == ""  # any port of a named host
    assert "127.0.0.2" in HostPolicy.from_params(mirrored).problem("http://127.0.0.2:8000/x.jpg")
