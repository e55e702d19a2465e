"""Experiment record: a train stage killed and resumed gives the bytes of an uninterrupted run, QAT included.

tests/test_training.py checks the float phase across a lost machine (the S3 store, a fresh
clone) and a kill at QAT's start; this runs the whole comparison once, outside the test
budget: on the fixture's 40 scenes (tiny config, from scratch, batch 4), one uninterrupted
run, and one killed (SIGKILL) after epoch ``--kill-after`` and again inside QAT, resumed each
time, its local state deleted first with ``--lose-disk`` (then it restores from
``train.resume_remote``, a folder). Prints each file of models/train, same or different.
Not a benchmark: no timing.

    .venv/bin/python bench/experiment_resume.py --epochs 2 --kill-after 1 --qat --lose-disk
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testkit.fixture import download_params, generate  # noqa: E402
from testkit.fixture_server import FixtureServer  # noqa: E402
from testkit.repo_copy import copy_repo  # noqa: E402

ENV = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def set_train(repo: Path, **values: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def train(repo: Path, kill_when: Callable[[], bool] | None = None) -> int:
    """``python -m stages.train`` in ``repo``; SIGKILL it once ``kill_when()``; return its exit code."""
    with open(repo.parent / f"{repo.name}.log", "a") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "stages.train"], cwd=repo, env=ENV, start_new_session=True, stdout=log, stderr=log
        )
        while child.poll() is None:
            if kill_when and kill_when():
                os.killpg(child.pid, signal.SIGKILL)
            time.sleep(0.05)
    return child.wait()


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--kill-after", type=int, default=1, help="the epoch after which the first kill lands")
    parser.add_argument("--qat", action="store_true", help="1 QAT epoch after the float phase, killed once at its start")
    parser.add_argument("--lose-disk", action="store_true", help="delete models/ and reports/ before each resume")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir, removed)")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="experiment-resume-"))
    fixture = work / "fixture"
    manifest = generate(fixture, images=40, seed=0, bad_boxes=True, corrupt_images=1)
    base = work / "cached"
    with FixtureServer(fixture) as server:
        overrides = {
            "download": {**download_params(server.url, manifest), "pretrained": "scratch"},
            "filter": {"images_per_class": "all"},
        }
        base.mkdir(parents=True)
        copy_repo(base, overrides)
        subprocess.run(["dvc", "repro", "cache"], cwd=base, env=ENV, check=True, capture_output=True)
    qat = {"enabled": args.qat, "epochs": 1, "learning_rate": 0.3, "batch_size": 4}
    train_params = {"init": "scratch", "epochs": args.epochs, "batch_size": 4, "qat": qat}

    uninterrupted = work / "uninterrupted"
    shutil.copytree(base, uninterrupted, symlinks=True)
    set_train(uninterrupted, **train_params)
    assert train(uninterrupted) == 0

    killed, remote = work / "killed", work / "remote"
    shutil.copytree(base, killed, symlinks=True)
    set_train(killed, **train_params, resume_remote=str(remote) if args.lose_disk else "")
    history, marker = killed / "models/train_state/history.json", killed / "models/train_state/state.json"
    backup, pointer = killed / "models/train_state/backup/chief/checkpoint", remote / "LATEST.json"

    def after_epoch() -> bool:  # epoch k backed up (and, with --lose-disk, its copy in the remote folder)
        if args.lose_disk:
            return pointer.exists() and json.loads(pointer.read_text())["epochs"] == args.kill_after
        return history.exists() and len(json.loads(history.read_text())) == args.kill_after and backup.exists()

    kills = [after_epoch]
    if args.qat:
        kills.append(lambda: marker.exists() and bool(json.loads(marker.read_text()).get("float_done")))
    for kill_when in kills:
        assert train(killed, kill_when) == -signal.SIGKILL
        if args.lose_disk:
            for output in ("models/train_state", "models/train", "reports/train", "reports/timing"):
                shutil.rmtree(killed / output, ignore_errors=True)
    assert train(killed) == 0
    printed = (work / "killed.log").read_text()
    before, after = digests(uninterrupted / "models/train"), digests(killed / "models/train")
    print(
        json.dumps(
            {
                "epochs": args.epochs,
                "killed_after_epoch": args.kill_after,
                "qat": args.qat,
                "lose_disk": args.lose_disk,
                "resumed_lines": [
                    line for line in printed.splitlines() if line.startswith("train: re") or line.startswith("Epoch ")
                ],
                "files": {name: before[name] == after.get(name) for name in before},
                "same_models_train": before == after,
            },
            indent=1,
        )
    )
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
