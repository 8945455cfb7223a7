"""The house's import rules: floors that import only downward, and no two modules that import each other.

Floors (the README's code map says the same): ``core`` (plumbing) at the bottom, then ``vocab`` (the BDD100K
vocabulary), then ``mini_bdd`` (the test-data generator), then the three stage folders ``convert``, ``ai`` and
``annotation`` side by side. A module imports its own package and the floors below it, never a floor above, and a
stage folder never imports another stage folder (a step that needs another stage runs its documented command).

Every import statement counts: at the top, inside a function (imported at call time) or under TYPE_CHECKING. A
cycle hidden in a function or a type-only import still ties the modules together (and breaks the moment someone
moves the import to the top), which is why ai/common/generation_config.py holds the generation config sections
and ai/controlnet/infer_config.py the ControlNet inference schema.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Each package's floor: a module may import its own package and lower floors only.
FLOORS: dict[str, int] = {"core": 0, "vocab": 1, "mini_bdd": 2, "convert": 3, "ai": 3, "annotation": 3}
PACKAGES = tuple(FLOORS)


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    modules = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_finder_sees_function_level_and_type_checking_imports(tmp_path):
    for name, text in {
        "ai/__init__.py": "",
        "ai/a.py": "def f():\n    from ai.b import g\n",
        "ai/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ai.a import f\n",
        "ai/c.py": "from ai import a\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
    assert cycles(import_graph(tmp_path)) == [["ai.a", "ai.b"]]


def test_project_modules_have_no_import_cycles():
    assert cycles(import_graph()) == []


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import that leaves the module's own package for one that is not on a lower floor."""
    found = []
    for name, targets in sorted(graph.items()):
        here = name.split(".")[0]
        for target in sorted(targets):
            there = target.split(".")[0]
            if there != here and FLOORS[there] >= FLOORS[here]:
                found.append(f"{name} -> {target}")
    return found


def test_the_floor_rule_sees_stage_to_stage_and_upward_imports(tmp_path):
    for name, text in {
        "core/io.py": "",
        "vocab/bdd.py": "from core import io\n",
        "convert/x.py": "from vocab import bdd\n",
        "ai/y.py": "def f():\n    from convert import x\n",
        "annotation/z.py": "import ai.y\n",
        "core/cli.py": "from vocab.bdd import DET_CLASSES\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
    assert upward_imports(import_graph(tmp_path)) == [
        "ai.y -> convert.x",
        "annotation.z -> ai.y",
        "core.cli -> vocab.bdd",
    ]


def test_project_imports_run_only_downward():
    assert upward_imports(import_graph()) == []
