"""The train stage's resume state in models/train_state: whose it is, what is kept, when it goes.

A killed run leaves its last finished epoch (Keras BackupAndRestore) and, once the float
phase is done, the float checkpoint; the next run with the same params and data resumes
from them, any other run starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from trafficdet.io import read_json, write_json
from trafficdet.paths import TRAIN_STATE


def fingerprint(params: dict[str, Any], cached: list[dict[str, Any]]) -> str:
    """What a saved training state belongs to: the train params and the cache records (the exact data)."""
    return hashlib.sha256(json.dumps([params, cached], sort_keys=True).encode()).hexdigest()


def prepare_state(state_id: str, scratch: Path | None, state_dir: Path) -> tuple[Path, bool]:
    """Keep a matching unfinished run's state (to resume) or start a fresh one; return the marker file
    and whether the float phase already finished (then only QAT is left to run).

    On a non-chief worker, a copy of the chief's backup goes into its scratch folder: Keras
    restores every worker from ``<backup>/chief``, and models/train_state stays the chief's.
    """
    marker = TRAIN_STATE / "state.json"
    saved = read_json(marker) if marker.exists() else {}
    resume = saved.get("fingerprint") == state_id and not saved.get("complete")
    float_done = bool(resume and saved.get("float_done"))
    if scratch is None:
        if not resume:
            shutil.rmtree(TRAIN_STATE, ignore_errors=True)
        TRAIN_STATE.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"fingerprint": state_id, "complete": False, "float_done": float_done}, indent=True)
    elif resume and (TRAIN_STATE / "backup/chief").exists():
        shutil.copytree(TRAIN_STATE / "backup/chief", state_dir / "backup/chief")
        if (TRAIN_STATE / "history.json").exists():
            shutil.copy2(TRAIN_STATE / "history.json", state_dir / "history.json")
    return marker, float_done


def keep_float_phase(out: Path, marker: Path, state_id: str) -> None:
    """Keep the finished float checkpoint in models/train_state, so a kill during QAT does not repeat it."""
    for file in out.glob("float_ckpt.*"):
        shutil.copy2(file, TRAIN_STATE / file.name)
    write_json(marker, {"fingerprint": state_id, "complete": False, "float_done": True}, indent=True)


def mark_complete(marker: Path, state_id: str) -> None:
    """The run finished: what was kept for resuming goes."""
    write_json(marker, {"fingerprint": state_id, "complete": True}, indent=True)
    shutil.rmtree(TRAIN_STATE / "backup", ignore_errors=True)
    for kept in [TRAIN_STATE / "history.json", *TRAIN_STATE.glob("float_ckpt.*")]:
        kept.unlink(missing_ok=True)
