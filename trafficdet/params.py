"""Reading one stage's section of ``params.yaml`` with early, named validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from trafficdet.errors import PipelineError

PARAMS_FILE = Path("params.yaml")


def load_section(name: str, path: Path = PARAMS_FILE) -> dict[str, Any]:
    """Return ``params.yaml``'s ``name`` section; each stage reads only its own."""
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found (run from the repository root)") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(params, dict) or not isinstance(params.get(name), dict):
        raise PipelineError(f"{path}: missing section '{name}:'")
    return params[name]


def require_choice(section: str, params: dict[str, Any], key: str, choices: list[str]) -> str:
    """Return ``params[key]`` if it is one of ``choices``, else a clear error."""
    value = params.get(key)
    if value not in choices:
        raise PipelineError(f"params.yaml {section}.{key}: {value!r} is not one of {', '.join(choices)}")
    return value


def require_positive_int(section: str, params: dict[str, Any], key: str) -> int:
    """Return ``params[key]`` if it is an integer > 0, else a clear error."""
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PipelineError(f"params.yaml {section}.{key}: must be a positive integer, got {value!r}")
    return value
