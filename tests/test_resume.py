"""The resume state without training: whose it is (a stale one is not resumed), and its durable copy
(train.resume_remote) on a folder and on the S3 store: whole epochs only, refused when another run's.

The kill/resume sequence through `dvc repro` is tests/test_training.py's
test_killed_training_resumes_from_last_epoch_then_reruns_only_qat (on the S3 store).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from testkit.object_store import ACCESS_KEY, SECRET_KEY, ObjectStore
from testkit.repo_copy import ROOT
from trafficdet.errors import PipelineError
from trafficdet.params import TrainParams, parse
from trafficdet.resume import differences, fingerprint, owner, prepare_state
from trafficdet.resume_remote import ResumeRemote
from trafficdet.start import resolve_start

CACHED = [{"size": 28, "num_shards": 1}, {"size": 7, "num_shards": 1}]


def train_params(**changes: object) -> TrainParams:
    return parse(TrainParams, {**yaml.safe_load((ROOT / "params.yaml").read_text())["train"], **changes})


def owned(params: TrainParams, cached: list[dict]) -> dict:
    """owner() as the stage calls it, with the start point read from models/pretrained now."""
    return owner(params, cached, resolve_start(params))


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder the stage would run in: dvc.yaml, the train stage's code files, a start point."""
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    for name in [dep for dep in deps if dep.endswith(".py")] + ["dvc.yaml"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    (tmp_path / "models/pretrained").mkdir(parents=True)
    (tmp_path / "models/pretrained/manifest.json").write_text('{"pretrained": "mobilenet_v2_imagenet", "sha256": "aa"}')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fake_state(state: Path, epochs: int, current: dict) -> None:
    """models/train_state as a run leaves it after ``epochs`` epochs (the checkpoint's bytes name the epoch)."""
    (state / "backup/chief").mkdir(parents=True, exist_ok=True)
    (state / "state.json").write_text(json.dumps({"fingerprint": fingerprint(current), "owner": current, "complete": False}))
    (state / "history.json").write_text(json.dumps([{"epoch": n + 1} for n in range(epochs)]))
    (state / "backup/chief/checkpoint").write_text(f'model_checkpoint_path: "ckpt-{epochs}"\n')
    (state / f"backup/chief/ckpt-{epochs}.data-00000-of-00001").write_bytes(bytes([epochs]) * 100_000)


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(params=["folder", "s3"])
def remote_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh resume_remote: a local folder, or a prefix on the S3 store (endpoint and keys from AWS_* variables)."""
    if request.param == "folder":
        return str(tmp_path / "drive" / "state")
    store: ObjectStore = request.getfixturevalue("object_store")
    for name, value in {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL": store.endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    return f"{store.url}/unit-{time.monotonic_ns()}"


def test_state_copies_whole_epochs_and_restores_the_newest_intact_one(
    remote_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Epoch 2 replaces epoch 1 only once all of it is there; a copy cut midway leaves epoch 2 readable;
    a snapshot whose bytes differ from the pointer's sha256 is skipped for the one before."""
    if remote_url.startswith("/"):
        (tmp_path / "drive").mkdir()
    current = {"params": {"epochs": 3}, "data": CACHED, "start_point": "aa", "code": {}}
    state, remote = tmp_path / "train_state", ResumeRemote(remote_url)
    remote.check_writable()
    assert remote.pointer() is None
    for epochs in (1, 2):
        fake_state(state, epochs, current)
        remote.push(state, epochs)
    epoch_two = files(state)
    assert remote.pointer()["epochs"] == 2 and remote.pointer()["previous"]["epochs"] == 1
    snapshots = remote.fs.ls(remote._path("snapshots"), detail=False)
    assert len(snapshots) == 2  # this epoch's and the one before; older ones go

    # The machine is lost while epoch 3 is being copied: its first file is there, the pointer is not switched.
    fake_state(state, 3, current)
    put_file, calls = remote.fs.put_file, []

    def lost_midway(local: str, target: str, **kwargs: object) -> None:
        calls.append(target)
        if len(calls) > 1:
            raise ConnectionError("machine lost")
        put_file(local, target, **kwargs)

    monkeypatch.setattr(remote.fs, "put_file", lost_midway)
    with pytest.raises(ConnectionError):
        remote.push(state, 3)
    monkeypatch.undo()
    reader = ResumeRemote(remote_url)  # the next machine
    assert reader.pointer()["epochs"] == 2
    restored = tmp_path / "restored"
    assert reader.pull(reader.pointer(), restored) == 2
    assert files(restored) == epoch_two

    # A snapshot that is not what its pointer says (a synced drive that showed the pointer first).
    pointer = reader.pointer()
    checkpoint = reader._path("snapshots", pointer["snapshot"], "backup/chief/ckpt-2.data-00000-of-00001")
    reader.fs.pipe_file(checkpoint, b"half")
    assert reader.pull(pointer, restored) == 1
    assert json.loads((restored / "history.json").read_text()) == [{"epoch": 1}]


def test_a_stale_local_state_is_not_resumed_and_says_why_in_one_line(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = repo / "models/train_state"
    before = owned(train_params(epochs=3), CACHED)
    fake_state(state, 1, before)
    assert prepare_state(before, None, state) == (Path("models/train_state/state.json"), False)
    assert (state / "backup/chief/checkpoint").exists() and capsys.readouterr().out == ""  # the same run: resumed

    after = owned(train_params(epochs=2), CACHED)
    prepare_state(after, None, state)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "train: models/train_state holds another run's unfinished state (train.epochs (3 there, 2 here)): "
        "not resumed, starting afresh"
    ]
    assert sorted(p.name for p in state.iterdir()) == ["state.json"]  # the old backup is gone
    assert json.loads((state / "state.json").read_text())["fingerprint"] == fingerprint(after)


def test_the_start_point_and_the_code_belong_to_the_state(repo: Path) -> None:
    """A changed models/pretrained or a changed code file makes another run; a moved remote does not."""
    params = train_params()
    base = owned(params, CACHED)
    assert fingerprint(owned(params.model_copy(update={"resume_remote": "s3://elsewhere/x"}), CACHED)) == fingerprint(base)

    (repo / "models/pretrained/manifest.json").write_text('{"pretrained": "mobilenet_v2_imagenet", "sha256": "bb"}')
    moved = owned(params, CACHED)
    assert fingerprint(moved) != fingerprint(base)
    assert differences(base, moved) == "the start point (models/pretrained)"

    with open(repo / "trafficdet/history.py", "a") as code:
        code.write("\n# changed\n")
    changed = owned(params, CACHED)
    assert differences(moved, changed) == "code trafficdet/history.py"
    assert differences(changed, owned(params, [*CACHED[:1], {"size": 8, "num_shards": 1}])) == "the training data (data/cache)"
    assert differences(None, base) == "it was written by an older version of the train stage"


def test_another_runs_unfinished_remote_state_is_refused_a_finished_one_replaced(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = str(repo / "drive")
    theirs = owned(train_params(epochs=3, qat={"enabled": True, "epochs": 2, "learning_rate": 0.3, "batch_size": 8}), CACHED)
    pushed = repo / "theirs"
    fake_state(pushed, 2, theirs)
    ResumeRemote(url).push(pushed, 2)
    stored = files(repo / "drive")

    ours = owned(train_params(epochs=3), CACHED)
    state = repo / "models/train_state"
    with pytest.raises(PipelineError) as refused:
        prepare_state(ours, None, state, ResumeRemote(url))
    assert str(refused.value) == (
        f"params.yaml train.resume_remote: {url} holds another run's unfinished state (after epoch 2; differs in "
        "train.qat.enabled (True there, False here), train.qat.epochs (2 there, 15 here)): it is neither resumed nor "
        "overwritten; set the params back to finish that run, point train.resume_remote at another folder, "
        "or delete that folder to drop it"
    )
    assert files(repo / "drive") == stored and not state.exists()  # nothing written, here or there

    # The same run's state: restored into an empty work tree.
    assert prepare_state(theirs, None, state, ResumeRemote(url)) == (Path("models/train_state/state.json"), False)
    assert capsys.readouterr().out == f"train: restored the state after epoch 2 from {url}\n"
    assert files(state)["backup/chief/ckpt-2.data-00000-of-00001"] == files(pushed)["backup/chief/ckpt-2.data-00000-of-00001"]

    # Once that run is complete, another may take the folder.
    (pushed / "state.json").write_text(json.dumps({"fingerprint": fingerprint(theirs), "complete": True}))
    ResumeRemote(url).push(pushed, 3)
    shutil.rmtree(state)
    prepare_state(ours, None, state, ResumeRemote(url))
    assert sorted(p.name for p in state.iterdir()) == ["state.json"]  # fresh: nothing restored


def test_an_unmounted_drive_or_a_missing_package_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"its parent folder .*/drive/MyDrive does not exist \(is the drive mounted\?\)"):
        ResumeRemote(str(tmp_path / "drive/MyDrive/state"))
    with pytest.raises(PipelineError, match=r"gs://bucket/state needs gcsfs, which is not installed"):
        ResumeRemote("gs://bucket/state")
