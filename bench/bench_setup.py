"""Set-up from a fresh clone: pip vs uv installing the locked set that `make test` needs.

Each round clones the repository (not timed), then times one installer building ``.venv``
from ``requirements.lock`` + ``requirements-dev.lock``:

- ``pip``: ``python3.11 -m venv .venv`` then ``.venv/bin/python -m pip install -r ... -r ...``
  (what `make setup` did before uv);
- ``uv``: ``uv venv --seed --python python3.11 .venv`` then ``uv pip sync --compile-bytecode
  --python .venv/bin/python requirements.lock requirements-dev.lock`` (what `make setup` runs,
  ops/setup_venv.py; both installers then hold compiled .pyc files).

The first run of each installer is reported apart: uv's with an empty cache of its own (as on a
new machine), pip's with whatever its cache held (this machine's pip keeps no HTTP cache); then ``--runs``
rounds alternate pip and uv, medians reported. Each venv's installed distributions (name and
version, pip/setuptools/wheel included) are compared: the sets must be the same lock.
Also timed: obtaining uv itself where the host has none (``python3 -m venv`` + ``pip install uv``).
pip reads this machine's pip config (find-links, extra index); uv reads none of it (PyPI only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import OUT, machine, median

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ("requirements.lock", "requirements-dev.lock")
LIST = "import importlib.metadata as m, json; print(json.dumps(sorted(f'{d.name}=={d.version}' for d in m.distributions())))"


def timed(commands: list[list[str]], cwd: Path) -> float:
    started = time.perf_counter()
    for command in commands:
        result = subprocess.run(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def install(installer: str, python: str, uv: str, repo: str, work: Path, cold: bool = False) -> tuple[float, list[str]]:
    """Clone ``repo`` into ``work``, time ``installer`` building its .venv; return seconds and what it holds."""
    clone = work / f"clone-{installer}"
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", repo, str(clone)], check=True)
    if installer == "pip":
        locks = [arg for lock in LOCKS for arg in ("-r", lock)]
        commands = [[python, "-m", "venv", ".venv"], [".venv/bin/python", "-m", "pip", "install", "-q", *locks]]
    else:
        sync = [uv, "pip", "sync", "-q", "--compile-bytecode", "--python", ".venv/bin/python", *LOCKS]
        commands = [[uv, "venv", "-q", "--seed", "--python", python, ".venv"], sync]
    saved = os.environ.get("UV_CACHE_DIR")
    if cold:  # an empty cache for uv (pip ignores the variable)
        os.environ["UV_CACHE_DIR"] = str(work / "uv-cache-cold")
    try:
        seconds = timed(commands, clone)
    finally:
        os.environ.pop("UV_CACHE_DIR", None)
        if saved is not None:
            os.environ["UV_CACHE_DIR"] = saved
    print(f"{installer}: {seconds:.1f} s", flush=True)
    installed = json.loads(subprocess.run([".venv/bin/python", "-c", LIST], cwd=clone, check=True, capture_output=True).stdout)
    shutil.rmtree(clone)
    return seconds, installed


def bootstrap_uv(version: str, work: Path) -> float:
    """What `make setup` does on a host without uv: a small venv with uv from PyPI."""
    target = work / "uv-bootstrap"
    shutil.rmtree(target, ignore_errors=True)
    seconds = timed(
        [["python3", "-m", "venv", str(target)], [str(target / "bin/python"), "-m", "pip", "install", "-q", f"uv=={version}"]],
        work,
    )
    shutil.rmtree(target)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repo", default=str(ROOT), help="what to clone (commit first: the clone sees commits only)")
    parser.add_argument("--python", default=shutil.which("python3.11"), help="the Python 3.11 both installers use")
    parser.add_argument("--uv", default=shutil.which("uv"), help="the uv binary (default: uv on PATH)")
    args = parser.parse_args()
    if not args.uv:
        sys.exit("error: no uv on PATH: give --uv /path/to/uv (e.g. .tools/uv/bin/uv after make setup)")
    python = os.path.realpath(args.python)
    uv_version = subprocess.run([args.uv, "--version"], check=True, capture_output=True, text=True).stdout.split()[1]
    OUT.mkdir(exist_ok=True)
    times: dict[str, list[float]] = {"pip": [], "uv": []}
    first: dict[str, float] = {}
    sets: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-setup-", dir="/tmp") as tmp:
        work = Path(tmp)
        for installer in ("uv", "pip"):  # first runs: whatever the caches held
            first[installer], sets[installer] = install(installer, python, args.uv, args.repo, work, cold=True)
        for _ in range(args.runs):
            for installer in times:
                seconds, installed = install(installer, python, args.uv, args.repo, work)
                times[installer].append(seconds)
                if installed != sets[installer]:
                    raise RuntimeError(f"{installer} installed another set in a later round")
        bootstrap = [bootstrap_uv(uv_version, work) for _ in range(args.runs)]
    only = {name: sorted(set(sets[name]) - set(sets[other])) for name, other in (("pip", "uv"), ("uv", "pip"))}
    result = {
        "machine": machine(),
        "python": python,
        "uv": uv_version,
        "runs": args.runs,
        "first_run_s": first,
        "seconds": times,
        "median_s": {name: median(values) for name, values in times.items()},
        "uv_bootstrap_s": bootstrap,
        "installed": {name: len(values) for name, values in sets.items()},
        "only_in": only,
        "load_average_after": os.getloadavg(),
    }
    (OUT / "setup.json").write_text(json.dumps(result, indent=2))
    print(f"{machine()}; {python}, uv {uv_version}; medians of {args.runs} rounds")
    print("| installer | first run s | median s | runs |")
    print("| --- | ---: | ---: | --- |")
    for name in times:
        print(f"| {name} | {first[name]:.1f} | {median(times[name]):.1f} | {', '.join(f'{s:.1f}' for s in times[name])} |")
    print(f"uv itself (python3 -m venv + pip install uv): median {median(bootstrap):.1f} s")
    print(f"pip / uv: {median(times['pip']) / median(times['uv']):.2f}x; only pip installed {only['pip']}; only uv {only['uv']}")


if __name__ == "__main__":
    main()
