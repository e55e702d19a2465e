"""notebooks/colab.ipynb: a valid notebook whose shell commands are exactly the README's (the source).

Colab itself cannot run here; what can is checked: the notebook's format, its Python cells, and
that its `sed` line really sets train.resume_remote in params.yaml.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import nbformat
import yaml

from testkit.repo_copy import ROOT
from trafficdet.params import TrainParams, parse

SECTION = "## A run that survives losing its machine"


def readme_commands() -> list[str]:
    """The commands of the bash block in the README's section on surviving a lost machine."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the section has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def notebook_commands(notebook: nbformat.NotebookNode) -> list[str]:
    """Each shell line (``!cmd``) and directory change (``%cd dir``) of the code cells, in order."""
    commands = []
    for cell in notebook.cells:
        for line in cell.source.splitlines() if cell.cell_type == "code" else []:
            if line.startswith("!"):
                commands.append(line[1:])
            elif line.startswith("%cd "):
                commands.append(f"cd {line[4:]}")
    return commands


def test_the_colab_notebook_runs_the_readmes_commands(tmp_path: Path) -> None:
    notebook = nbformat.read(ROOT / "notebooks/colab.ipynb", as_version=4)
    nbformat.validate(notebook)
    commands = notebook_commands(notebook)
    assert commands == readme_commands()
    assert "make setup" in commands and "make repro" in commands
    python = [cell.source for cell in notebook.cells if cell.cell_type == "code" and not re.search(r"^[!%]", cell.source, re.M)]
    assert any('drive.mount("/content/drive")' in source for source in python)
    assert any('files.download("models/model.tflite")' in source for source in python)
    for source in python:
        ast.parse(source)

    # The sed line sets the param the train stage reads (and nothing else in params.yaml).
    (sed,) = [command for command in commands if command.startswith("sed ")]
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    subprocess.run(["bash", "-c", sed], cwd=tmp_path, check=True)
    before = yaml.safe_load((ROOT / "params.yaml").read_text())
    after = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert parse(TrainParams, after["train"]).resume_remote == "/content/drive/MyDrive/traffic-detector-state"
    after["train"]["resume_remote"] = before["train"]["resume_remote"]
    assert after == before
