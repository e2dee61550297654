"""The package's import structure: no module imports itself back through others, and every
module imports cleanly (a moved or renamed module breaks here, not in a user's run).

The graph is read from the source with ``ast``: every ``import`` / ``from ... import`` in a
module counts, at module level, inside functions and under ``if TYPE_CHECKING:`` alike (a
cycle hidden behind a lazy or type-only import is still two modules that each need the
other). Relative imports are resolved; importing a package counts as importing its
``__init__``; ``from pkg import sub`` counts as importing the submodule ``sub``."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import fuxi_mme

PACKAGE = "fuxi_mme"
ROOT = Path(fuxi_mme.__file__).parent
# Third-party packages that are optional extras: a module needing one is skipped, not failed,
# when it is not installed.
OPTIONAL = {"triton", "fastapi", "uvicorn", "httpx", "matplotlib", "onnx", "onnxruntime", "optuna", "tensorboard"}
# Entry points that run on import.
ENTRY_POINTS = {f"{PACKAGE}.__main__"}


def _modules() -> dict[str, Path]:
    """Dotted name -> source file of every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        if "__pycache__" in parts:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _nearest(name: str) -> str | None:
    """The package module ``name`` refers to: itself, or its nearest enclosing module."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name if name.startswith(PACKAGE) else None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Package modules imported by one import statement of ``module``."""
    if isinstance(node, ast.Import):
        return [t for a in node.names if (t := _nearest(a.name))]
    if node.level:  # relative: from the module's own package, one level up per extra dot
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        base = ".".join(package.split(".")[: len(package.split(".")) - (node.level - 1)])
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    if not base.startswith(PACKAGE):
        return []
    # ``from pkg import sub`` imports the submodule; ``from pkg import name`` the package.
    return [t for a in node.names if (t := _nearest(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base))]


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported package module: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in MODULES.items():
        edges = graph.setdefault(module, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, node):
                    if target != module:
                        edges.setdefault(target, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Import cycles as [m0, m1, ..., m0]: in each group of modules that reach each other
    (strongly connected component, Tarjan), the shortest cycle through each member, without
    repeats."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found: list[list[str]] = []
    for component in sorted(components):
        for member in component:
            cycle = _cycle_in(graph, set(component), member)[:-1]
            first = cycle.index(min(cycle))
            cycle = cycle[first:] + cycle[:first]
            if cycle + cycle[:1] not in found:
                found.append(cycle + cycle[:1])
    return found


def _cycle_in(graph: dict[str, dict[str, int]], component: set[str], start: str) -> list[str]:
    """The shortest cycle from ``start`` back to itself inside ``component`` (breadth-first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w in component and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a component but on no cycle")


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    steps = [f"{a} (line {graph[a][b]}) -> " for a, b in zip(cycle, cycle[1:])]
    return "".join(steps) + cycle[-1]


def test_cycle_finder_reports_a_known_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"d": 5}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert _describe(graph, ["a", "b", "c", "a"]) == "a (line 1) -> b (line 2) -> c (line 3) -> a"
    assert cycles({"a": {"b": 1}, "b": {}}) == []
    two = {"a": {"b": 1}, "b": {"a": 2, "c": 3}, "c": {"b": 4}}  # one group, two cycles
    assert cycles(two) == [["a", "b", "a"], ["b", "c", "b"]]


def test_relative_and_package_imports_resolve():
    """Relative imports, ``from pkg import sub`` and imports of a package's names resolve to the
    modules Python would load."""
    graph = import_graph()
    assert f"{PACKAGE}.models.attention.fused" in graph[f"{PACKAGE}.models.attention.select"]  # lazy, in a function
    assert f"{PACKAGE}.models.attention.shared" in graph[f"{PACKAGE}.models.attention.reference"]  # from .shared
    assert f"{PACKAGE}.models.common" in graph[f"{PACKAGE}.models.attention.reference"]  # from ..common
    assert f"{PACKAGE}.models.attention" in graph[f"{PACKAGE}.models.hstu"]  # names of a package: its __init__
    assert f"{PACKAGE}.cli" in graph[f"{PACKAGE}.__main__"]


def test_attention_paths_do_not_import_each_other():
    graph = import_graph()
    reference, fused = f"{PACKAGE}.models.attention.reference", f"{PACKAGE}.models.attention.fused"
    assert fused not in graph[reference] and reference not in graph[fused]


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles in the package:\n" + "\n".join(_describe(graph, c) for c in found)


@pytest.mark.parametrize("module", sorted(set(MODULES) - ENTRY_POINTS))
def test_every_module_imports(module):
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in OPTIONAL:
            pytest.skip(f"{module} needs the optional package {e.name}")
        raise
