"""The package's shape: layers that import only the ones below them, no import cycle,
components never import the CLI or the recipes, the benchmark imports the trainer and never the
reverse, adapter tensor names spelled in one place, and the command line without torch."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "meft"
# the entry points: the only modules allowed to import the recipes / CLI
TOP = {"meft.cli", "meft.cli.commands", "meft.cli.recipes", "meft.__main__"}


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


# the layers, bottom up (src/meft/__init__.py): a module imports only modules of its own layer
# or of layers below it; "meft" itself (the public API, imported lazily) sits on top
LAYERS = [
    ("base", ("meft._version", "meft.errors", "meft.console", "meft.sysinfo")),
    ("engine", ("meft.engine",)),
    ("config", ("meft.config",)),
    ("adapter", ("meft.adapter",)),
    ("data", ("meft.data",)),
    ("evaluation", ("meft.evaluation",)),
    ("training", ("meft.training",)),
    ("cli", ("meft.cli", "meft.__main__")),
    ("api", ("meft",)),
]


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i if module != "meft" else len(LAYERS) - 1
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def test_every_module_imports_only_its_layer_or_those_below() -> None:
    graph = import_graph()
    upward = sorted(f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
                    for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))
    assert upward == []
    # every layer has modules: a moved file cannot silently leave its layer empty
    assert {LAYERS[layer_of(m)][0] for m in graph} == {name for name, _ in LAYERS}


def test_the_command_line_imports_no_torch() -> None:
    """`meft --help` answers without loading torch (it took 2-4 s)."""
    import subprocess
    import sys

    code = ("import sys, meft.cli, meft.cli.commands as c; c.build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def test_components_never_import_the_cli_or_the_recipes() -> None:
    graph = import_graph()
    offenders = {m: deps & TOP for m, deps in graph.items() if m not in TOP and deps & TOP}
    assert offenders == {}
    assert "meft.training.trainer" in graph["meft.cli.bench.run"]
    assert not any(d.startswith("meft.cli.bench") for d in graph["meft.training.trainer"])


def test_adapter_tensor_names_are_spelled_once() -> None:
    pattern = re.compile(r"layers\.\{")
    spelled = [p.name for p in SRC.rglob("*.py") if pattern.search(p.read_text())]
    assert spelled == ["model.py"]
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    assert not any(pattern.search(p.read_text()) for p in scripts.glob("*.py"))
