"""requirements-gpu.lock: requirements.lock plus exactly the nvidia-* pins of TensorFlow's ``and-cuda`` extra.

TF 2.15's plain wheel finds a GPU only with CUDA 12.2 and cuDNN 8.9 installed system-wide;
its ``and-cuda`` extra pins them as nvidia-* wheels. The pins are read from the installed
TensorFlow's own metadata, so this needs no network and no multi-GB download:

    python -m ops.gpu_lock            # write requirements-gpu.lock (make lock runs this)
    python -m ops.gpu_lock --check    # exit 1 if the committed file differs

Checked with pip (``pip install --dry-run --ignore-installed -r requirements-gpu.lock``):
the nvidia wheels need nothing outside this set.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CPU_LOCK, GPU_LOCK = ROOT / "requirements.lock", ROOT / "requirements-gpu.lock"
EXTRA = "and-cuda"


def extra_pins(distribution: str = "tensorflow", extra: str = EXTRA) -> list[str]:
    """``name==version`` for each requirement the installed ``distribution`` adds with ``extra`` (exact pins only)."""
    pins = []
    for line in importlib.metadata.requires(distribution) or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or not marker.evaluate({"extra": extra}) or marker.evaluate({"extra": ""}):
            continue  # a base requirement, or another extra's
        (spec,) = requirement.specifier  # TF pins each one exactly; anything else is a surprise worth stopping on
        if spec.operator != "==":
            raise ValueError(f"{distribution}[{extra}]: {line!r} is not an exact pin")
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
        raise ValueError(f"requirements.lock already pins {sorted(clash)}, which the {EXTRA} extra pins too")
    return "\n".join(sorted([*lines, *pins], key=lock_name)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file instead of writing it")
    args = parser.parse_args()
    wanted = gpu_lock(CPU_LOCK.read_text(), extra_pins())
    if not args.check:
        GPU_LOCK.write_text(wanted)
    elif GPU_LOCK.read_text() != wanted:
        sys.exit(f"error: {GPU_LOCK.name} is not requirements.lock plus tensorflow[{EXTRA}]'s pins: run make lock")


if __name__ == "__main__":
    main()
