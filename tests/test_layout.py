"""The layout is the design: dvc.yaml declares exactly the code each stage runs, and roles stay apart."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from trafficdet import paths

ROOT = Path(__file__).resolve().parents[1]
PRODUCT, TOOLING = "trafficdet", ("testkit", "ops", "tests", "bench")


def local_imports(module: Path, seen: set[Path] | None = None) -> set[Path]:
    """``module`` and every repository module it imports, directly or not (lazy imports included)."""
    seen = seen if seen is not None else {module}
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            for candidate in (ROOT / f"{name.replace('.', '/')}.py", ROOT / name.replace(".", "/") / "__init__.py"):
                if candidate.is_file() and candidate not in seen:
                    seen.add(candidate)
                    local_imports(candidate, seen)
    return seen


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_declares_exactly_the_modules_it_imports() -> None:
    for name, stage in stages().items():
        assert stage["cmd"] == f"python -m stages.{name}", f"{name}: its code should be stages/{name}.py"
        imported = {
            path.relative_to(ROOT).as_posix()
            for path in local_imports(ROOT / "stages" / f"{name}.py")
            if path.name != "__init__.py"
        }
        declared = {dep for dep in stage["deps"] if dep.endswith(".py")}
        assert imported - declared == set(), f"{name} imports modules dvc.yaml does not declare"
        assert declared - imported == set(), f"{name} declares modules it does not import"


def test_every_path_in_dvc_yaml_is_named_in_the_paths_module() -> None:
    named = {str(value) for value in vars(paths).values() if isinstance(value, Path)}
    named |= {str(paths.split_labels(side)) for side in paths.SIDES} | {str(paths.cache_dir(side)) for side in paths.SIDES}
    for name, stage in stages().items():
        entries = [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]
        declared = [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]
        data_deps = [dep for dep in stage["deps"] if not dep.endswith(".py") and "${" not in dep]
        for path in declared + data_deps:
            assert any(path == n or path.startswith(n + "/") for n in named), f"{name}: {path} is not in trafficdet/paths.py"


def test_product_code_imports_no_tooling() -> None:
    for module in sorted((ROOT / PRODUCT).rglob("*.py")):
        for path in local_imports(module):
            top = path.relative_to(ROOT).parts[0]
            assert top not in TOOLING, f"{module.name} imports {path.relative_to(ROOT)}"


def test_no_stage_module_is_long() -> None:
    for module in sorted((ROOT / "stages").glob("*.py")):
        assert len(module.read_text().splitlines()) <= 300, module.name
