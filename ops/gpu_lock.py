"""requirements-gpu.lock: requirements.lock plus exactly the nvidia-* pins of TensorFlow's ``and-cuda`` extra.

TF 2.15's plain wheel finds a GPU only with CUDA 12.2 and cuDNN 8.9 installed system-wide;
its ``and-cuda`` extra pins them as nvidia-* wheels. The pins are read from the installed
TensorFlow's own metadata, so this needs no network and no multi-GB download:

    python -m ops.gpu_lock            # write requirements-gpu.lock
    python -m ops.gpu_lock --check    # exit 1 if the committed file differs
    python -m ops.gpu_lock --resolve  # write it, then ask pip (PyPI, metadata only) that it needs nothing more

``make lock`` runs ``--resolve``: ``pip install --dry-run --ignore-installed --report`` resolves the
set without installing it; the nvidia wheels need only each other (cudnn: cublas, nvrtc; cusolver:
cublas, cusparse, nvjitlink), all in the extra.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.utils import canonicalize_name

from trafficdet.device import CUDA_EXTRA, extra_requirements

ROOT = Path(__file__).resolve().parents[1]
CPU_LOCK, GPU_LOCK = ROOT / "requirements.lock", ROOT / "requirements-gpu.lock"


def extra_pins() -> list[str]:
    """``name==version`` for each requirement the installed TensorFlow adds with ``and-cuda`` (exact pins only)."""
    pins = []
    for requirement in extra_requirements():
        (spec,) = requirement.specifier  # TF pins each one exactly; anything else is a surprise worth stopping on
        if spec.operator != "==":
            raise ValueError(f"tensorflow[{CUDA_EXTRA}]: {requirement} is not an exact pin")
        pins.append(f"{requirement.name}=={spec.version}")
    return pins


def lock_name(line: str) -> str:
    """The sort key pip freeze orders a lock by: the project name, lower case."""
    return line.split("==", 1)[0].lower()


def gpu_lock(cpu_lock: str, pins: list[str]) -> str:
    """The CPU lock's lines and ``pins`` together, in pip freeze's order; a package in both is an error."""
    lines = [line for line in cpu_lock.splitlines() if line.strip()]
    clash = {lock_name(p) for p in pins} & {lock_name(line) for line in lines}
    if clash:
        raise ValueError(f"requirements.lock already pins {sorted(clash)}, which the {CUDA_EXTRA} extra pins too")
    return "\n".join(sorted([*lines, *pins], key=lock_name)) + "\n"


def unlocked_needs(lock: Path) -> list[str]:
    """What pip would install for ``lock`` beyond the lock itself (needs PyPI; nothing is installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report)]
        subprocess.run([*command, "-r", str(lock)], check=True)
        resolved = {item["metadata"]["name"]: item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}
    locked = {canonicalize_name(line.split("==", 1)[0]) for line in lock.read_text().split()}
    return sorted(f"{name}=={version}" for name, version in resolved.items() if canonicalize_name(name) not in locked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file instead of writing it")
    parser.add_argument("--resolve", action="store_true", help="after writing, check with pip that the set needs nothing more")
    args = parser.parse_args()
    wanted = gpu_lock(CPU_LOCK.read_text(), extra_pins())
    if not args.check:
        GPU_LOCK.write_text(wanted)
    elif GPU_LOCK.read_text() != wanted:
        sys.exit(f"error: {GPU_LOCK.name} is not requirements.lock plus tensorflow[{CUDA_EXTRA}]'s pins: run make lock")
    if args.resolve and (extra := unlocked_needs(GPU_LOCK)):
        sys.exit(f"error: {GPU_LOCK.name} does not resolve alone: pip would also install {', '.join(extra)}")


if __name__ == "__main__":
    main()
