"""The packages import only downward (service -> public, runner -> workflows -> core; public -> core), and one
module touches BentoML below its public API."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {
    "service": {"core", "public", "runner", "workflows"},
    "public": {"core"},
    "runner": {"core", "workflows"},
    "workflows": {"core"},
    "core": set(),
}
PRIVATE = ("bentoml._internal", "_bentoml_impl", "_bentoml_sdk")


def imports(unit: str) -> dict[Path, set[str]]:
    path = REPO / unit
    files = [path.with_suffix(".py")] if not path.is_dir() else sorted(path.rglob("*.py"))
    found: dict[Path, set[str]] = {}
    for f in files:
        names: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[f.relative_to(REPO)] = names
    return found


def test_each_package_imports_only_downward():
    for unit, allowed in ALLOWED.items():
        for path, names in imports(unit).items():
            reached = {name.split(".")[0] for name in names} & set(ALLOWED) - {unit}
            assert reached <= allowed, f"{path} imports {sorted(reached - allowed)}"


def test_one_module_touches_bentoml_internals():
    touching = [
        str(path)
        for unit in ALLOWED
        for path, names in imports(unit).items()
        if any(name.startswith(PRIVATE) for name in names)
    ]
    assert touching == ["core/bentoml_seam.py"]
