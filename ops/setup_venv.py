"""make setup: .venv on Python 3.11 with the locked set this machine needs (any python3 >= 3.8 runs this).

Which set: requirements-gpu.lock (TensorFlow's CUDA wheels) where ``nvidia-smi -L`` lists a GPU,
or with GPU=1; requirements.lock otherwise, or with GPU=0. The venv remembers its set in
.venv/.installed: a GPU=0/1 stands until the other is given; a detected set is detected again
on each run (a repository on a shared drive may meet a CPU runtime, then a GPU one). Changing set,
or a lock, syncs the venv to exactly the new locks; nothing else is touched.

Which Python builds the venv (TensorFlow 2.15 has no 3.12 build, and Colab, Ubuntu 24.04 and
Debian 13 ship 3.12): $PYTHON if given, else python3.11 on PATH, else the one uv finds or
downloads (``uv python install 3.11``), else one line saying what to do.

The installer is uv: ``uv venv --seed`` (pip stays usable in the venv) and ``uv pip sync
--compile-bytecode`` (exactly the locks, compiled as pip does), faster than pip from a fresh clone
(BENCHMARKS.md). uv is the host's
where it has one (Colab does), else one pip installs into .tools/uv.
Standard library only, no f-string or typing feature past 3.8: this runs before the venv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ".venv"
STAMP = ".installed"  # in the venv: which locks it holds, and why that set
CPU_LOCK, GPU_LOCK, DEV_LOCK = "requirements.lock", "requirements-gpu.lock", "requirements-dev.lock"
UV_VERSION = "0.13.9"  # the uv installed into .tools/uv where the host has none
UV_HOME = ".tools/uv"
WANTED = (3, 11)
NO_311 = (
    "install Python 3.11 (pyenv install 3.11, the deadsnakes PPA on Ubuntu, or `uv python install 3.11` where "
    "GitHub is reachable) and rerun, or run make setup PYTHON=/path/to/python3.11"
)


class SetupError(Exception):
    """What stops the set-up, as one line with the fix."""


def version_of(python: str) -> tuple[int, ...] | None:
    """``(3, 11, 7)`` for an interpreter, None if it does not run (a pyenv shim of a version not selected...)."""
    try:
        result = subprocess.run(
            [python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    try:
        return tuple(int(part) for part in result.stdout.split()[0].split(".")) if result.returncode == 0 else None
    except (IndexError, ValueError):
        return None


def dotted(version: tuple[int, ...] | None) -> str:
    return ".".join(map(str, version)) if version else "?"


def choose_python(given: str, get_uv) -> str:
    """The Python 3.11 to build the venv from: ``given`` ($PYTHON), python3.11 on PATH, or uv's; else SetupError."""
    if given:
        found = shutil.which(given)
        version = version_of(found) if found else None
        if version is None:
            raise SetupError(f"PYTHON={given}: not found or does not run: give the path of a Python 3.11, or leave PYTHON unset")
        if version[:2] != WANTED:
            raise SetupError(
                f"PYTHON={given} is Python {dotted(version)}, not 3.11 (TensorFlow 2.15 has no build for it): "
                "give a Python 3.11, or leave PYTHON unset and make setup finds or fetches one"
            )
        return found
    found = shutil.which("python3.11")
    if found and (version_of(found) or ())[:2] == WANTED:
        return found
    uv = get_uv()  # --system: not a venv's python (uv would offer .venv's own, the one being rebuilt)
    located = subprocess.run([uv, "python", "find", "--system", "3.11"], capture_output=True, text=True)
    if located.returncode != 0:
        print("make setup: no Python 3.11 here; uv python install 3.11 (a download)", flush=True)
        fetched = subprocess.run([uv, "python", "install", "3.11"], capture_output=True, text=True)
        if fetched.returncode != 0:
            raise SetupError(f"no Python 3.11 on this machine and uv could not download one ({last_line(fetched)}): {NO_311}")
        located = subprocess.run([uv, "python", "find", "--system", "3.11"], capture_output=True, text=True)
    path = located.stdout.strip().splitlines()[-1] if located.returncode == 0 and located.stdout.strip() else ""
    if not path or (version_of(path) or ())[:2] != WANTED:
        raise SetupError(f"no Python 3.11 on this machine (uv found none): {NO_311}")
    return path


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
    return lines[-1] if lines else f"exit {result.returncode}"


def find_uv(root: Path) -> str:
    """The host's uv, else the one in .tools/uv, installed there now by pip if missing."""
    found = shutil.which("uv") or (str(root / UV_HOME / "bin/uv") if (root / UV_HOME / "bin/uv").exists() else "")
    if found:
        return found
    home = root / UV_HOME
    print(f"make setup: installing uv {UV_VERSION} into {UV_HOME} (python3 -m venv + pip)", flush=True)
    install = [str(home / "bin/python"), "-m", "pip", "install", "-q", f"uv=={UV_VERSION}"]
    for command in ([sys.executable, "-m", "venv", str(home)], install):
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            shutil.rmtree(home, ignore_errors=True)
            raise SetupError(
                f"make setup needs uv and could not install it with {Path(sys.executable).name} -m venv + pip "
                f"({last_line(result)}): install uv (pip install uv, pipx install uv, or docs.astral.sh/uv), "
                "or the venv module (apt-get install python3-venv), and rerun"
            )
    return str(home / "bin/uv")


def gpus_listed() -> int:
    """How many GPUs ``nvidia-smi -L`` lists (0 where it is missing or fails)."""
    found = shutil.which("nvidia-smi")
    if not found:
        return 0
    try:
        result = subprocess.run([found, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in result.stdout.splitlines()) if result.returncode == 0 else 0


def choose_set(gpu: str, stamp: dict) -> tuple[bool, str]:
    """(GPU set?, why): GPU=0/1 if given, else the venv's own explicit choice, else what nvidia-smi lists."""
    if gpu in ("0", "1"):
        return gpu == "1", f"GPU={gpu}"
    if stamp.get("chosen_by") in ("GPU=0", "GPU=1"):
        return stamp["set"] == "gpu", stamp["chosen_by"]
    listed = gpus_listed()
    return listed > 0, f"nvidia-smi lists {listed} GPU{'s' if listed != 1 else ''}"


def read_stamp(venv: Path) -> dict:
    try:
        stamp = json.loads((venv / STAMP).read_text())
    except (OSError, ValueError):
        return {}  # no venv, or one from before sets were recorded (an empty file)
    return stamp if isinstance(stamp, dict) else {}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def setup(root: Path, gpu: str = "", python: str = "", dev: bool = False) -> None:
    """Bring ``root``/.venv to the wanted locks, creating it if needed; silent when it already holds them."""
    venv = root / VENV
    stamp = read_stamp(venv)
    on_gpu, chosen_by = choose_set(gpu, stamp)
    locks = [GPU_LOCK if on_gpu else CPU_LOCK]
    if dev or DEV_LOCK in stamp.get("locks", {}) or (venv / ".installed-dev").exists():  # dev tools stay once there
        locks.append(DEV_LOCK)
    wanted = {"set": "gpu" if on_gpu else "cpu", "chosen_by": chosen_by, "locks": {name: digest(root / name) for name in locks}}
    venv_python = venv / "bin/python"
    healthy = (version_of(str(venv_python)) or ())[:2] == WANTED
    if healthy and {key: stamp.get(key) for key in ("set", "locks")} == {key: wanted[key] for key in ("set", "locks")}:
        if stamp.get("chosen_by") != chosen_by:
            (venv / STAMP).write_text(json.dumps(wanted, indent=1) + "\n")
        return
    uv = find_uv(root)
    if not healthy:
        interpreter = choose_python(python, lambda: uv)
        shutil.rmtree(venv, ignore_errors=True)
        if venv.is_symlink():
            venv.unlink()
        run([uv, "venv", "--seed", "--python", interpreter, str(venv)])
    print(f"make setup: {' + '.join(locks)} into {VENV} ({chosen_by})", flush=True)
    (venv / STAMP).unlink(missing_ok=True)  # a sync that fails halfway leaves a venv that holds no known set
    # --compile-bytecode: as pip does; without it every import compiles the sources anew where .pyc files
    # cannot be written (PYTHONDONTWRITEBYTECODE, as the tests set): measured, TensorFlow's import took 2-3x as long.
    run([uv, "pip", "sync", "--compile-bytecode", "--python", str(venv_python), *[str(root / name) for name in locks]])
    (venv / STAMP).write_text(json.dumps(wanted, indent=1) + "\n")


def run(command: list[str]) -> None:
    result = subprocess.run(command)
    if result.returncode != 0:
        raise SetupError(f"{' '.join(command[:3])} ... failed (exit {result.returncode}, its output is above)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default=os.environ.get("GPU", ""), help="1: the GPU set, 0: the CPU set, empty: detect")
    parser.add_argument("--python", default=os.environ.get("PYTHON", ""), help="the Python 3.11 to use (default: find one)")
    parser.add_argument("--dev", action="store_true", help="also requirements-dev.lock (make test)")
    parser.add_argument("--print-python", action="store_true", help="only print the Python 3.11 make setup would use")
    args = parser.parse_args(argv)
    # uv trusts its own bundled roots unless told otherwise; the platform's store also holds a proxy's or a
    # company's CA (measured here: without SSL_CERT_FILE, uv failed with UnknownIssuer where pip worked).
    os.environ.setdefault("UV_SYSTEM_CERTS", "1")
    try:
        if args.gpu not in ("", "0", "1"):
            raise SetupError(f"GPU={args.gpu}: use GPU=1 (the GPU set), GPU=0 (the CPU set), or leave it unset (detect)")
        if args.print_python:
            print(choose_python(args.python, lambda: find_uv(ROOT)))
        else:
            setup(ROOT, args.gpu, args.python, args.dev)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
