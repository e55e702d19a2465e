"""The train stage's resume state in models/train_state: whose it is, what is kept, when it goes.

A killed run leaves its last finished epoch (Keras BackupAndRestore) and, once the float
phase is done, the float checkpoint; the next run with the same params, data, start point
and code resumes from them, any other run starts afresh (and says why). With
``train.resume_remote`` the state is also copied to durable storage after every epoch
(trafficdet/resume_remote.py), and a run that finds no resumable state on its own disk
restores it from there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from trafficdet.errors import PipelineError
from trafficdet.io import read_json, write_json
from trafficdet.params import TrainParams
from trafficdet.paths import PIPELINE, PRETRAINED, TRAIN_STATE
from trafficdet.resume_remote import KEY, ResumeRemote
from trafficdet.start import Start

NOT_OWNED = {"resume_remote"}  # where the state is copied to, not what it is a state of


def code_files(pipeline: Path = PIPELINE) -> list[str]:
    """The train stage's code: the .py files dvc.yaml declares as its deps."""
    deps = yaml.safe_load(pipeline.read_text())["stages"]["train"]["deps"]
    return sorted(dep for dep in deps if dep.endswith(".py"))


def _file_hash(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def owner(params: TrainParams, cached: list[dict[str, Any]], start: Start) -> dict[str, Any]:
    """What a training state belongs to: the train params, the cache records (the exact data), the start
    point (models/pretrained's manifest, which holds the fetched file's sha256) and the stage's code."""
    return {
        "params": params.model_dump(exclude=NOT_OWNED),
        "data": cached,
        "start_point": start.manifest_sha256,
        "code": {name: _file_hash(Path(name)) for name in code_files()},
    }


def fingerprint(owned_by: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(owned_by, sort_keys=True).encode()).hexdigest()


def _flat(params: dict[str, Any], prefix: str = "train.") -> dict[str, Any]:
    flat = {}
    for key, value in params.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def differences(saved: dict[str, Any] | None, current: dict[str, Any]) -> str:
    """What makes a saved state another run's, in words: ``train.epochs (3 there, 2 here), code stages/train.py``."""
    if not saved:
        return "it was written by an older version of the train stage"
    found = []
    there, here = _flat(saved.get("params", {})), _flat(current["params"])
    for key in sorted(set(there) | set(here)):
        if there.get(key) != here.get(key):
            found.append(f"{key} ({there.get(key, 'unset')!r} there, {here.get(key, 'unset')!r} here)")
    if saved.get("data") != current["data"]:
        found.append("the training data (data/cache)")
    if saved.get("start_point") != current["start_point"]:
        found.append(f"the start point ({PRETRAINED})")
    code_there, code_here = saved.get("code", {}), current["code"]
    changed = sorted(name for name in set(code_there) | set(code_here) if code_there.get(name) != code_here.get(name))
    if changed:
        found.append(f"code {', '.join(changed)}")
    return ", ".join(found) or "its fingerprint"


def check_remote(remote: ResumeRemote, state_id: str, current: dict[str, Any]) -> dict[str, Any] | None:
    """The remote's pointer if it holds this run's unfinished state; None if it holds nothing or a finished run
    (which this run may replace). Another run's unfinished state is refused: never resumed, never overwritten."""
    pointer = remote.pointer()
    if pointer is None or pointer.get("complete"):
        return None
    if pointer.get("fingerprint") != state_id:
        raise PipelineError(
            f"{KEY}: {remote.url} holds another run's unfinished state (after epoch {pointer.get('epochs', '?')}; "
            f"differs in {differences(pointer.get('owner'), current)}): it is neither resumed nor overwritten; "
            "set the params back to finish that run, point train.resume_remote at another folder, "
            "or delete that folder to drop it"
        )
    return pointer


def checked_remote(params: TrainParams, chief: bool, current: dict[str, Any]) -> ResumeRemote | None:
    """train.resume_remote, checked on the chief before TensorFlow starts: bad credentials, an unmounted
    drive, another run's state."""
    remote = ResumeRemote(params.resume_remote) if params.resume_remote else None
    if remote and chief:
        remote.check_writable()
        check_remote(remote, fingerprint(current), current)
    return remote


def prepare_state(
    current: dict[str, Any], discard: Path | None, state_dir: Path, remote: ResumeRemote | None = None
) -> tuple[Path, bool]:
    """Keep a matching unfinished run's state (to resume), restore it from ``remote``, or start a fresh one;
    return the marker file and whether the float phase already finished (then only QAT is left to run).

    ``discard`` is a non-chief worker's throwaway folder (None on the chief, whose ``state_dir`` is
    models/train_state): a copy of the chief's backup goes into that worker's ``state_dir``, since Keras
    restores every worker from ``<backup>/chief`` and models/train_state stays the chief's.
    """
    state_id = fingerprint(current)
    marker = TRAIN_STATE / "state.json"
    saved = read_json(marker) if marker.exists() else {}
    resume = saved.get("fingerprint") == state_id and not saved.get("complete")
    if saved and not resume and not saved.get("complete") and discard is None:
        why = differences(saved.get("owner"), current)
        print(f"train: {TRAIN_STATE} holds another run's unfinished state ({why}): not resumed, starting afresh")
    pointer = check_remote(remote, state_id, current) if remote else None
    restored = None
    if not resume and pointer is not None:
        restored = remote.pull(pointer, TRAIN_STATE if discard is None else state_dir)
        if restored is None:
            print(f"train: the state in {remote.url} is incomplete (a file missing or changed): starting afresh")
        else:
            print(f"train: restored the state after epoch {restored} from {remote.url}")
            saved, resume = pointer, True
    float_done = bool(resume and saved.get("float_done"))
    if discard is None:
        if not resume:
            shutil.rmtree(TRAIN_STATE, ignore_errors=True)
        TRAIN_STATE.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"fingerprint": state_id, "owner": current, "complete": False, "float_done": float_done}, indent=True)
    elif resume and restored is None and (TRAIN_STATE / "backup/chief").exists():
        shutil.copytree(TRAIN_STATE / "backup/chief", state_dir / "backup/chief")
        if (TRAIN_STATE / "history.json").exists():
            shutil.copy2(TRAIN_STATE / "history.json", state_dir / "history.json")
    return marker, float_done


def keep_float_phase(out: Path, marker: Path) -> None:
    """Keep the finished float checkpoint in models/train_state, so a kill during QAT does not repeat it."""
    for file in out.glob("float_ckpt.*"):
        shutil.copy2(file, TRAIN_STATE / file.name)
    write_json(marker, {**read_json(marker), "float_done": True}, indent=True)


def mark_complete(marker: Path) -> None:
    """The run finished: what was kept for resuming goes."""
    write_json(marker, {"fingerprint": read_json(marker)["fingerprint"], "complete": True}, indent=True)
    shutil.rmtree(TRAIN_STATE / "backup", ignore_errors=True)
    for kept in [TRAIN_STATE / "history.json", *TRAIN_STATE.glob("float_ckpt.*")]:
        kept.unlink(missing_ok=True)
