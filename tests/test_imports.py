"""Data flows one way through `pipeline/`: no module imports, directly or through others, a module that
imports it back. Every import counts, including the lazy ones inside functions (they still tie the modules
together; they only move the cost to call time)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the pipeline modules it imports anywhere in its source (top level or inside functions)."""
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in modules:
        deps: set[str] = set()
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "pipeline":  # `from pipeline import tracking, evaluate as ev`
                    deps |= {a.name for a in node.names if a.name in modules}
                elif node.module.startswith("pipeline."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names
                         if a.name.startswith("pipeline.") and a.name.split(".")[1] in modules}
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
    (tmp_path / "a.py").write_text("from pipeline.b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from pipeline import c\n")
    (tmp_path / "c.py").write_text("import pipeline.a\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    (tmp_path / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(tmp_path)) is None


def test_pipeline_has_no_import_cycle():
    graph = import_graph()
    assert "cli" in graph and graph["cli"], "the finder read the package"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
