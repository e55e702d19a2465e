"""Typed params: every key of params.yaml, set to a wrong type and removed, gives one line naming it.

Each case runs the stage that reads the key (in-process: the stage parses its section first,
so nothing else runs); a few run as `python -m stages.<name>` to show there is no traceback.
"""

from __future__ import annotations

import copy
import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from testkit.repo_copy import ROOT
from tests.conftest import make_repo, run
from trafficdet.errors import PipelineError, run_stage
from trafficdet.params import (
    DownloadParams,
    EvaluateParams,
    ExportParams,
    FilterParams,
    Section,
    SplitParams,
    TrainParams,
    parse,
)

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
MODELS: dict[str, type[Section]] = {
    model.name: model for model in (DownloadParams, FilterParams, SplitParams, TrainParams, ExportParams, EvaluateParams)
}
READERS = {  # section -> the stages that parse it (dvc.yaml: each stage reads its own section)
    "download": ["download", "images"],
    "filter": ["filter"],
    "split": ["split"],
    "train": ["train"],
    "export": ["export"],
    "evaluate": ["evaluate"],
}


def keys_of(values: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a section, nested sections and their keys included."""
    found = []
    for key, value in values.items():
        found.append((*prefix, key))
        if isinstance(value, dict):
            found.extend(keys_of(value, (*prefix, key)))
    return found


def wrong_type(value: Any) -> Any:
    """A value of another type than ``value`` that no key accepts in its place (strict parsing)."""
    return 12345 if isinstance(value, str) else "abc"


CASES = [
    pytest.param(section, path, stage, kind, id=f"{stage}-{'.'.join((section, *path))}-{kind}")
    for section, values in PARAMS.items()
    for path in keys_of(values)
    for stage in READERS[section]
    for kind in ("wrong_type", "missing")
]


def test_every_key_is_covered_and_typed() -> None:
    """The table above is params.yaml itself: a new key is tested without editing this file."""
    assert set(PARAMS) == set(MODELS) == set(READERS)
    for name, model in MODELS.items():
        assert model.model_validate(PARAMS[name]), name  # the shipped file parses
        top = {path[0] for path in keys_of(PARAMS[name])}
        assert top == set(model.model_fields), name


def edited(section: str, path: tuple[str, ...], kind: str) -> dict[str, Any]:
    params = copy.deepcopy(PARAMS)
    parent = params[section]
    for key in path[:-1]:
        parent = parent[key]
    if kind == "missing":
        del parent[path[-1]]
    else:
        parent[path[-1]] = wrong_type(parent[path[-1]])
    return params


@pytest.mark.parametrize(("section", "path", "stage", "kind"), CASES)
def test_a_wrong_or_missing_key_is_one_line_naming_it(
    section: str, path: tuple[str, ...], stage: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    params = edited(section, path, kind)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(SystemExit) as exited:
        run_stage(importlib.import_module(f"stages.{stage}").main)
    assert exited.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    key = ".".join((section, *path))
    if kind == "missing":
        assert lines[0].startswith(f"error: params.yaml {key}: missing"), lines[0]
    else:
        found = params[section]
        for part in path:
            found = found[part]
        assert lines[0].startswith(f"error: params.yaml {key}: expected "), lines[0]
        assert lines[0].endswith(f"got {found!r}"), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing else was written


@pytest.mark.parametrize(
    ("stage", "section", "key", "value", "expected"),
    [
        (
            "split",
            "split",
            "val_fraction",
            "abc",
            "params.yaml split.val_fraction: expected a number between 0 and 1 (exclusive), got 'abc'",
        ),
        ("train", "train", "learning_rate", "fast", "params.yaml train.learning_rate: expected a positive number, got 'fast'"),
        ("images", "download", "timeout_s", "soon", "params.yaml download.timeout_s: expected a positive number, got 'soon'"),
        ("split", "split", "seed", None, "params.yaml split.seed: missing"),
        ("split", "split", "sed", 42, "params.yaml split.sed: unknown key; did you mean 'seed'?"),
        (
            "images",
            "download",
            "allowed_hosts",
            ["http://x.org/"],
            "params.yaml download.allowed_hosts: expected a list of host names",
        ),
    ],
    ids=["val_fraction-abc", "learning_rate-fast", "timeout_s-soon", "no-seed", "typo-sed", "allowed_hosts-url"],
)
def test_the_command_line_shows_one_line_and_no_traceback(
    stage: str, section: str, key: str, value: Any, expected: str, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo", {})
    params = yaml.safe_load((repo / "params.yaml").read_text())
    if value is None:
        del params[section][key]
    else:
        if key == "sed":
            del params[section]["seed"]
        params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run([sys.executable, "-m", f"stages.{stage}"], repo, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: {expected}"), result.stderr
    assert [p.name for p in (repo / "data").iterdir()] == ["own"]  # nothing written
    assert not (repo / "models").exists() and not (repo / "reports").exists()


# Keys that change how a stage runs, not what it writes: deliberately left out of dvc.yaml's params.
NOT_DECLARED = {
    "download": {"image_workers", "retries", "backoff_s", "timeout_s", "min_kbytes_per_s"},
    "train": {"resume_remote"},
}


def test_every_param_is_declared_in_dvc_yaml_or_named_as_changing_no_output() -> None:
    """A new key must be declared (or added to NOT_DECLARED on purpose), never silently left out of dvc.yaml."""
    declared: dict[str, set[str]] = {name: set() for name in MODELS}
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for entry in stage.get("params", []):
            section, _, key = entry.partition(".")
            declared[section] |= {key.split(".")[0]} if key else set(MODELS[section].model_fields)
    for name, model in MODELS.items():
        left_out = NOT_DECLARED.get(name, set())
        assert declared[name] & left_out == set(), f"{name}: declared although named as changing no output"
        assert declared[name] | left_out == set(model.model_fields), f"{name}: undeclared keys"


URL_KEYS = ("mirror", "annotations_url", "relabel_url", "checkpoint_url", "train_zip_url", "val_zip_url")
BAD_URLS = {
    "http://[::1": "malformed URL (Invalid IPv6 URL)",
    "http://[zz]/x.zip": "malformed URL ('zz' does not appear to be an IPv4 or IPv6 address)",
    "http://example.org:99999/x.zip": "malformed URL (Port out of range 0-65535)",
    "http://example.org:8o/x.zip": "malformed URL (Port could not be cast to integer value as '8o')",
    "http://:8000/x.zip": "URL without a host",
    "http://exa%20mple.org/x.zip": "host 'exa%20mple.org' is not a host name",
}


@pytest.mark.parametrize("key", URL_KEYS)
@pytest.mark.parametrize("url", list(BAD_URLS))
def test_every_url_param_is_parsed_in_full_at_load(key: str, url: str) -> None:
    """Brackets, ports and hosts: one line naming the key, never a ValueError from deep in a download."""
    values = {**PARAMS["download"], key: url}
    with pytest.raises(PipelineError) as raised:
        parse(DownloadParams, values)
    assert str(raised.value) == (
        f"params.yaml download.{key}: expected an http:// or https:// URL ({BAD_URLS[url]}), got {url!r}"
    )
    for good in ("http://[::1]:8000", "https://example.org:8443/a/b.zip?x=1", "http://127.0.0.1:8000/x"):
        assert getattr(parse(DownloadParams, {**PARAMS["download"], key: good}), key) == good


def test_a_bad_mirror_stops_the_stage_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    params = copy.deepcopy(PARAMS)
    params["download"]["mirror"] = "http://[::1"  # ended in "ValueError: Invalid IPv6 URL" and a traceback
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("download", "images"):
        with pytest.raises(SystemExit) as exited:
            run_stage(importlib.import_module(f"stages.{stage}").main)
        assert exited.value.code == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert lines == [
            "error: params.yaml download.mirror: expected an http:// or https:// URL (malformed URL (Invalid IPv6 URL)), got 'http://[::1'"
        ]
