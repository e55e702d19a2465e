"""Helpers shared by the benchmarks: machine description and repeated, isolated timing."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).parent / "out"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, Python {platform.python_version()}"


def run_child(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter (own peak RSS); it must print one JSON line last."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def median(values: list[float]) -> float:
    return statistics.median(values)


def sized_args(doc: str, images: int, runs: int = 3) -> argparse.Namespace:
    """``--images`` and ``--runs`` of a benchmark over a synthetic set; bench/out/ exists afterwards."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--runs", type=int, default=runs)
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    return args
