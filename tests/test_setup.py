"""make setup: the GPU lock, the set the venv remembers, the Python 3.11 it finds (stand-ins on PATH)."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from ops import setup_venv
from ops.gpu_lock import extra_pins, gpu_lock

ROOT = Path(__file__).resolve().parents[1]
A100 = "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5f2a0c1e-8f0e-4f0a-9a61-0c4d2b1e7a11)"


def lock_lines(name: str) -> list[str]:
    return (ROOT / name).read_text().splitlines()


def test_gpu_lock_is_the_cpu_lock_plus_tensorflows_and_cuda_pins() -> None:
    """Read from the installed TensorFlow's own metadata: every ``extra == "and-cuda"`` requirement, as a pin."""
    and_cuda = set()
    for line in importlib.metadata.requires("tensorflow"):
        requirement = Requirement(line)
        if str(requirement.marker) == 'extra == "and-cuda"':
            and_cuda.add(f"{requirement.name}{requirement.specifier}")
    assert len(and_cuda) == 12 and all(pin.startswith("nvidia-") and "==" in pin for pin in and_cuda)
    cpu, gpu = lock_lines("requirements.lock"), lock_lines("requirements-gpu.lock")
    assert sorted(gpu) == sorted(cpu + sorted(and_cuda))  # nothing else added, removed or changed
    assert [line for line in gpu if line in cpu] == cpu  # the CPU lock's order kept (pip freeze's)
    assert gpu_lock((ROOT / "requirements.lock").read_text(), extra_pins()) == (ROOT / "requirements-gpu.lock").read_text()


def stand_in(folder: Path, name: str, body: str) -> Path:
    """An executable shell script ``folder/name``; only shell built-ins and absolute paths inside (PATH is the stand-ins)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def python_stand_in(folder: Path, name: str, version: str) -> Path:
    return stand_in(folder, name, f"echo {version}")


def uv_stand_in(folder: Path, log: Path, found: str = "", install_ok: bool = False) -> Path:
    """A uv that logs its commands; ``python find`` answers ``found`` (only after ``python install`` if ``install_ok``);
    ``venv`` makes a venv whose python says 3.11.9."""
    marker = folder / "installed"
    return stand_in(
        folder,
        "uv",
        f"""echo "$*" >> {log}
case "$1 $2 $3" in
  "python find --system") if [ -n "{found}" ] && {{ [ "{install_ok}" = False ] || [ -e {marker} ]; }}
                 then echo {found}; exit 0; fi
                 echo "error: No interpreter found for Python 3.11 in managed installations or search path" >&2; exit 2;;
  "python install 3.11") if [ "{install_ok}" = True ]; then : > {marker}; exit 0; fi
                    echo "error: Failed to download https://github.com/astral-sh/python-build-standalone/...: dns" >&2
                    exit 1;;
  "venv --seed "*) /bin/mkdir -p "$5/bin"; printf '#!/bin/sh\\necho 3.11.9\\n' > "$5/bin/python"; /bin/chmod +x "$5/bin/python";;
esac""",
    )


def no_uv() -> str:
    raise AssertionError("uv was not needed here")


def test_python_311_is_given_then_on_path_then_uvs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir, log = tmp_path / "bin", tmp_path / "uv.log"
    monkeypatch.setenv("PATH", str(bin_dir))
    python_stand_in(bin_dir, "python3", "3.12.1")  # the host's Python: never the venv's
    given = python_stand_in(tmp_path / "elsewhere", "python", "3.11.4")
    assert setup_venv.choose_python(str(given), no_uv) == str(given)
    with pytest.raises(setup_venv.SetupError, match=r"PYTHON=.* is Python 3\.12\.1, not 3\.11"):
        setup_venv.choose_python(str(bin_dir / "python3"), no_uv)

    on_path = python_stand_in(bin_dir, "python3.11", "3.11.9")
    assert setup_venv.choose_python("", no_uv) == str(on_path)

    on_path.write_text("#!/bin/sh\necho 'pyenv: python3.11: command not found' >&2; exit 127\n")  # a shim that does not run
    managed = python_stand_in(tmp_path / "uv-python", "python3.11", "3.11.14")
    uv = uv_stand_in(bin_dir, log, found=str(managed))
    assert setup_venv.choose_python("", lambda: str(uv)) == str(managed)  # uv finds one: nothing downloaded
    assert log.read_text().splitlines() == ["python find --system 3.11"]

    log.unlink()
    uv = uv_stand_in(bin_dir, log, found=str(managed), install_ok=True)
    assert setup_venv.choose_python("", lambda: str(uv)) == str(managed)  # none found: uv downloads one
    assert log.read_text().splitlines() == ["python find --system 3.11", "python install 3.11", "python find --system 3.11"]


def test_no_python_311_to_be_had_offline_is_one_line_with_the_fix(tmp_path: Path) -> None:
    """The script itself, run by a 3.12-only host's python3: no python3.11, uv cannot download one."""
    bin_dir = tmp_path / "bin"
    uv_stand_in(bin_dir, tmp_path / "uv.log")
    result = subprocess.run(
        [sys.executable, str(ROOT / "ops/setup_venv.py"), "--print-python"],
        capture_output=True,
        text=True,
        env={"PATH": str(bin_dir)},
    )
    assert result.returncode == 1 and result.stdout.startswith("make setup: no Python 3.11 here")
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: no Python 3.11 on this machine and uv could not download one (error: Failed to download")
    assert "install Python 3.11" in line and "make setup PYTHON=/path/to/python3.11" in line


def test_the_venv_remembers_its_set_and_a_switch_syncs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU=1/0 stand until the other is given; a detected set follows nvidia-smi; each change is one exact ``uv pip sync``."""
    root, bin_dir, log = tmp_path / "repo", tmp_path / "bin", tmp_path / "uv.log"
    root.mkdir()
    for name in ("requirements.lock", "requirements-gpu.lock", "requirements-dev.lock"):
        shutil.copy(ROOT / name, root / name)
    monkeypatch.setenv("PATH", str(bin_dir))
    python_stand_in(bin_dir, "python3.11", "3.11.9")
    uv_stand_in(bin_dir, log)

    def setup(**options: object) -> list[str]:
        """What uv was asked to do by one make setup: its commands, the paths shortened to file names."""
        log.write_text("")
        setup_venv.setup(root, **options)
        return [
            " ".join(Path(word).name if "/" in word else word for word in line.split()) for line in log.read_text().splitlines()
        ]

    def stamp() -> dict:
        return json.loads((root / ".venv/.installed").read_text())

    sync = "pip sync --compile-bytecode --python python"
    assert setup() == ["venv --seed --python python3.11 .venv", f"{sync} requirements.lock"]  # no nvidia-smi: the CPU set
    assert stamp()["set"] == "cpu" and stamp()["chosen_by"] == "nvidia-smi lists 0 GPUs"
    assert setup() == []  # up to date: nothing runs
    stand_in(bin_dir, "nvidia-smi", f'echo "{A100}"')
    assert setup() == [f"{sync} requirements-gpu.lock"]  # a GPU appeared: detected again, the venv kept
    assert stamp()["chosen_by"] == "nvidia-smi lists 1 GPU"
    assert setup(gpu="0") == [f"{sync} requirements.lock"]  # forced back to the CPU set...
    assert setup() == []  # ... and it stands though nvidia-smi lists a GPU
    assert setup(dev=True) == [f"{sync} requirements.lock requirements-dev.lock"]  # make test
    assert setup(gpu="1") == [f"{sync} requirements-gpu.lock requirements-dev.lock"]  # the dev tools stay
    assert stamp()["set"] == "gpu" and stamp()["chosen_by"] == "GPU=1"
    (root / "requirements-gpu.lock").write_text((root / "requirements-gpu.lock").read_text() + "six==1.17.0\n")
    assert setup() == [f"{sync} requirements-gpu.lock requirements-dev.lock"]  # a changed lock: synced again
