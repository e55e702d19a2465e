"""Versioned data and models on a real S3 remote: SeaweedFS on 127.0.0.1, no S3 mocks.

Round trip (push, fresh clone, pull: bit-identical, nothing to reproduce), pulling the
model alone (counted at the wire), releases pinning a model, the store killed during a
push, and one clear line for bad credentials or an unreachable endpoint.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from testkit.object_store import ObjectStore
from testkit.repo_copy import commit_all
from tests.conftest import PipelineRun, run, set_param, stages_run
from tests.s3_proxy import CountingProxy

OUTPUT_ROOTS = ("data", "models")
_prefixes = itertools.count()


def file_md5s(repo: Path) -> dict[str, str]:
    """md5 of every file under data/ and models/ (the DVC outputs), temp dirs aside."""
    digests = {}
    for root in OUTPUT_ROOTS:
        for path in sorted((repo / root).rglob("*")):
            relative = path.relative_to(repo).as_posix()
            if path.is_file() and not relative.startswith(("data/.tmp/", "data/.downloads/")):
                digests[relative] = hashlib.md5(path.read_bytes()).hexdigest()
    return digests


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def locked_md5(repo: Path, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] == path:
                return out["md5"]
    raise AssertionError(f"{path} not in dvc.lock")


def add_remote(repo: Path, store: ObjectStore, name: str = "storage", endpoint: str | None = None, local: bool = False) -> str:
    """Point ``name`` at a fresh prefix of the store's bucket; return its URL."""
    url = f"{store.url}/run{next(_prefixes)}"
    scope = ["--local"] if local else []
    run(["dvc", "remote", "add", *scope, "-f", *([] if local else ["-d"]), name, url], repo)
    run(["dvc", "remote", "modify", *scope, name, "endpointurl", endpoint or store.endpoint], repo)
    return url


def fresh_clone(repo: Path, dest: Path, rev: str | None = None) -> Path:
    subprocess.run(["git", "clone", "-q", str(repo), str(dest)], check=True)
    if rev:
        subprocess.run(["git", "checkout", "-q", rev], cwd=dest, check=True)
    assert not (dest / ".dvc/cache").exists()  # nothing but what the remote gives
    return dest


@pytest.fixture(scope="module")
def released_repo(tiny_pipeline: PipelineRun, object_store: ObjectStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run, committed with a remote, pushed and released as v1.0.0."""
    repo = tmp_path_factory.mktemp("released") / "repo"
    shutil.copytree(tiny_pipeline.repo, repo, symlinks=True)
    add_remote(repo, object_store)
    commit_all(repo, "tiny run with a remote")
    pushed = run(["dvc", "push"], repo)
    assert "pushed" in pushed.stdout, pushed.stdout
    assert "in sync" in run(["dvc", "status", "--cloud"], repo).stdout
    run(["python", "-m", "ops.release", "1.0.0"], repo)
    return repo


@pytest.mark.slow
def test_push_then_pull_into_a_fresh_clone_is_bit_identical(released_repo: Path, tmp_path: Path) -> None:
    clone = fresh_clone(released_repo, tmp_path / "clone")
    run(["dvc", "pull"], clone)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone).stdout
    assert stages_run(run(["dvc", "repro"], clone).stdout) == []
    original, pulled = file_md5s(released_repo), file_md5s(clone)
    assert len(original) > 50 and "models/model.tflite" in original and "data/split/val/labels.json" in original
    assert pulled == original


@pytest.mark.slow
def test_pulling_the_model_alone_transfers_only_the_model(released_repo: Path, object_store: ObjectStore, tmp_path: Path) -> None:
    clone = fresh_clone(released_repo, tmp_path / "clone")
    model = released_repo / "models/model.tflite"
    with CountingProxy(int(object_store.endpoint.rsplit(":", 1)[1])) as proxy:
        run(["dvc", "remote", "modify", "--local", "storage", "endpointurl", proxy.endpoint], clone)
        pulled = run(["dvc", "pull", "models/model.tflite"], clone)
    assert "1 file fetched" in pulled.stdout, pulled.stdout
    digest = locked_md5(released_repo, "models/model.tflite")
    fetched = proxy.object_requests("GET")
    assert len(fetched) == 1 and fetched[0].endswith(f"{digest[:2]}/{digest[2:]}"), proxy.requests
    size = model.stat().st_size
    assert size <= proxy.bytes_down < size + 64 * 1024  # the model plus HTTP headers and the bucket check
    cached = [p for p in (clone / ".dvc/cache").rglob("*") if p.is_file()]
    assert cached == [clone / ".dvc/cache/files/md5" / digest[:2] / digest[2:]]
    assert md5(clone / "models/model.tflite") == md5(model)
    assert not (clone / "models/train").exists() and not (clone / "data/images").exists()

    # The model registry route: the artifact from the repo, no clone.
    out = tmp_path / "artifact"
    out.mkdir()
    run(["dvc", "artifacts", "get", str(released_repo), "traffic-detector", "-o", "model.tflite"], out)
    assert md5(out / "model.tflite") == md5(model)


@pytest.mark.slow
def test_a_release_tag_restores_its_exact_model(released_repo: Path, tmp_path: Path) -> None:
    v1 = md5(released_repo / "models/model.tflite")
    set_param(released_repo, "export", "quantization", "float16")
    changed = run(["dvc", "repro"], released_repo)
    assert stages_run(changed.stdout) == ["export", "evaluate"]  # only what the param feeds
    assert json.loads((released_repo / "models/metadata.json").read_text())["quantization"] == "float16"
    v2 = md5(released_repo / "models/model.tflite")
    assert v2 != v1
    refused = run(["python", "-m", "ops.release", "1.1.0"], released_repo, check=False)
    assert refused.returncode == 1 and "commit your changes first" in refused.stderr
    commit_all(released_repo, "float16 model")
    refused = run(["python", "-m", "ops.release", "1.1.0"], released_repo, check=False)
    assert refused.returncode == 1 and "run `dvc push` first" in refused.stderr
    run(["dvc", "push"], released_repo)
    run(["python", "-m", "ops.release", "1.1.0"], released_repo)

    clone = fresh_clone(released_repo, tmp_path / "clone", rev="traffic-detector@v1.0.0")
    run(["dvc", "pull", "models/model.tflite"], clone)
    assert md5(clone / "models/model.tflite") == v1
    subprocess.run(["git", "checkout", "-q", "traffic-detector@v1.1.0"], cwd=clone, check=True)
    run(["dvc", "pull", "models/model.tflite"], clone)
    assert md5(clone / "models/model.tflite") == v2

    for rev, expected in (("v1.0.0", v1), (None, v2)):  # no --rev: the latest release
        out = tmp_path / f"artifact-{rev}"
        out.mkdir()
        run(["dvc", "artifacts", "get", str(released_repo), "traffic-detector", *(["--rev", rev] if rev else [])], out)
        assert md5(out / "model.tflite") == expected, rev


@pytest.mark.slow
def test_push_completes_after_the_store_is_killed_midway(released_repo: Path, tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "s3").start()  # its own store: this test kills it
    kill_at = 10

    def kill_at_tenth_upload(method: str, path: str) -> None:
        if method == "PUT" and "/files/md5/" in path and len(proxy.object_requests("PUT")) == kill_at:
            store.kill()

    try:
        with CountingProxy(int(store.endpoint.rsplit(":", 1)[1]), on_request=kill_at_tenth_upload) as proxy:
            url = add_remote(released_repo, store, name="faulty", endpoint=proxy.endpoint, local=True)
            # One attempt per request: against a dead endpoint botocore otherwise retries each
            # file with backoff, and the failed push takes minutes instead of seconds.
            killed = run(
                ["dvc", "push", "-r", "faulty"], released_repo, check=False, AWS_MAX_ATTEMPTS="1", AWS_RETRY_MODE="standard"
            )
            assert killed.returncode != 0 and "Traceback" not in killed.stderr
            assert store.process is not None and store.process.poll() is not None  # killed during the push
            store.start()  # same data dir and ports, as a restarted server
            assert "in sync" not in run(["dvc", "status", "--cloud", "-r", "faulty"], released_repo).stdout
            proxy.on_request = None
            run(["dvc", "push", "-r", "faulty"], released_repo)
            assert "in sync" in run(["dvc", "status", "--cloud", "-r", "faulty"], released_repo).stdout

        clone = fresh_clone(released_repo, tmp_path / "clone")
        run(["dvc", "remote", "add", "--local", "faulty", url], clone)
        run(["dvc", "remote", "modify", "--local", "faulty", "endpointurl", store.endpoint], clone)
        run(["dvc", "pull", "-r", "faulty"], clone)
        assert file_md5s(clone) == file_md5s(released_repo)
    finally:
        store.stop()
        (released_repo / ".dvc/config.local").unlink(missing_ok=True)


def test_bad_credentials_and_unreachable_endpoint_give_one_clear_line(released_repo: Path, object_store: ObjectStore) -> None:
    assert "reachable, credentials accepted" in run(["python", "-m", "ops.remote", "check"], released_repo).stdout

    denied = run(["python", "-m", "ops.remote", "check"], released_repo, check=False, AWS_SECRET_ACCESS_KEY="wrong")
    lines = denied.stderr.strip().splitlines()
    assert denied.returncode == 1 and len(lines) == 1, denied.stderr
    assert lines[0].startswith("error: DVC remote 'storage' (s3://trafficdet/") and object_store.endpoint in lines[0]
    assert "access denied" in lines[0] and "AWS_SECRET_ACCESS_KEY" in lines[0]
    # dvc itself fails too, without a traceback, naming the 403
    raw = run(["dvc", "push"], released_repo, check=False, AWS_SECRET_ACCESS_KEY="wrong")
    assert raw.returncode != 0 and "Traceback" not in raw.stderr and "Forbidden" in raw.stderr

    from testkit.object_store import free_ports

    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    run(["dvc", "remote", "modify", "--local", "storage", "endpointurl", closed], released_repo)
    try:
        down = run(["python", "-m", "ops.remote", "check"], released_repo, check=False)
    finally:
        (released_repo / ".dvc/config.local").unlink()
    lines = down.stderr.strip().splitlines()
    assert down.returncode == 1 and len(lines) == 1, down.stderr
    assert closed in lines[0] and "cannot connect" in lines[0]
