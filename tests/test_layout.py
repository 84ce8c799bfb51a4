"""The house rules of ``src/gradtrace`` that a reader relies on to find things: one name per
public function or class, modules short enough to read in one sitting, and a measuring core
that never imports Lightning (``test_measure_torch_only.py`` runs it with torch alone)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "gradtrace"
MAX_LINES = 400
# ``python -m`` entry points: each command module's ``main`` is the convention, not a clash.
ENTRY_POINT = "main"


def modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_no_two_public_functions_or_classes_share_a_name() -> None:
    defined: dict[str, list[str]] = defaultdict(list)
    for path in modules():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                defined[node.name].append(str(path.relative_to(SRC)))
    shared = {name: where for name, where in defined.items() if len(where) > 1}
    assert set(shared) <= {ENTRY_POINT}, shared


def test_no_module_is_over_the_limit() -> None:
    long = {
        str(path.relative_to(SRC)): lines
        for path in modules()
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def imported(nodes: list[ast.AST]) -> set[str]:
    """Top-level package names the import statements among ``nodes`` name."""
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_measuring_core_imports_no_lightning() -> None:
    lightning = {"lightning", "pytorch_lightning", "lightning_fabric"}
    anywhere = {
        str(path.relative_to(SRC)): bad
        for path in sorted((SRC / "measure").rglob("*.py"))
        if (bad := imported(list(ast.walk(ast.parse(path.read_text())))) & lightning)
    }
    assert anywhere == {}
    # compat reads Lightning's internals, importing it inside those functions only
    assert not imported(ast.parse((SRC / "compat.py").read_text()).body) & lightning
