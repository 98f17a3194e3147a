"""Data flows one way through `pipeline/`: no module imports, directly or through others, a module that
imports it back. Every import counts, including the lazy ones inside functions (they still tie the modules
together; they only move the cost to call time).

Modules are named by their path under `pipeline/` (`data.dicom`, `promote.gate`, `cli`)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """`data.dicom` -> pipeline/data/dicom.py; packages' `__init__` files are left out."""
    return {".".join(p.relative_to(package).with_suffix("").parts): p for p in sorted(package.rglob("*.py"))
            if p.stem != "__init__"}


def imported_modules(node: ast.AST, modules: set[str]) -> set[str]:
    """The pipeline modules one import statement names (`from pipeline.data import dicom` names data.dicom)."""
    found: set[str] = set()
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        if node.module == "pipeline" or node.module.startswith("pipeline."):
            base = node.module.removeprefix("pipeline").lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                if sub in modules:
                    found.add(sub)  # `from pipeline.data import dicom`
                elif base in modules:
                    found.add(base)  # `from pipeline.data.dicom import read_dicom`
    elif isinstance(node, ast.Import):
        for alias in node.names:
            name = alias.name.removeprefix("pipeline.") if alias.name.startswith("pipeline.") else ""
            if name in modules:
                found.add(name)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the pipeline modules it imports anywhere in its source (top level or inside functions)."""
    files = module_names(package)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            deps |= imported_modules(node, set(files))
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None; depth-first search with colours."""
    colour = dict.fromkeys(graph, 0)  # 0 unvisited, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        colour[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if colour.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if colour.get(d) == 0 and (found := visit(d)):
                return found
        stack.pop()
        colour[m] = 2
        return None

    for m in sorted(graph):
        if colour[m] == 0 and (found := visit(m)):
            return found
    return None


def test_the_finder_sees_lazy_imports_and_cycles(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("from pipeline.sub.b import x\n")
    (tmp_path / "sub" / "b.py").write_text("def f():\n    from pipeline import c\n")
    (tmp_path / "c.py").write_text("import pipeline.a\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"sub.b"}, "sub.b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "sub.b", "c", "a"]
    (tmp_path / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(tmp_path)) is None
    (tmp_path / "a.py").write_text("from pipeline.sub import b\n")  # a module named through its package
    assert import_graph(tmp_path)["a"] == {"sub.b"}


def test_pipeline_has_no_import_cycle():
    graph = import_graph()
    assert "cli" in graph and graph["cli"], "the finder read the package"
    assert "data.dicom" in graph and "promote.gate" in graph, "the finder read the subpackages"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
