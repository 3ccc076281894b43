"""The package's shape: no import cycle, components never import the CLI or the recipes, the
benchmark imports the trainer and never the reverse, and adapter tensor names are spelled in
one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "meft"
TOP = {"meft.cli", "meft.recipes", "meft.__main__"}  # the entry points: the only modules allowed
# to import the recipes / CLI


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> meft modules it imports anywhere (module level or inside functions)."""
    modules = {_module(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_no_import_cycle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep.startswith(node + "."):
                continue  # a package importing its own submodules
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, node, dep])
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert len(graph) > 20


def test_components_never_import_the_cli_or_the_recipes() -> None:
    graph = import_graph()
    offenders = {m: deps & TOP for m, deps in graph.items() if m not in TOP and deps & TOP}
    assert offenders == {}
    assert "meft.trainer" in graph["meft.bench.run"]
    assert not any(d.startswith("meft.bench") for d in graph["meft.trainer"])


def test_adapter_tensor_names_are_spelled_once() -> None:
    pattern = re.compile(r"layers\.\{")
    spelled = [p.name for p in SRC.rglob("*.py") if pattern.search(p.read_text())]
    assert spelled == ["model.py"]
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    assert not any(pattern.search(p.read_text()) for p in scripts.glob("*.py"))
