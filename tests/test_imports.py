"""Data flows one way through `pipeline/`: no module imports, directly or through others, a module that
imports it back (the cycle test), and no module imports from a group later in LAYERS (the layer test). Every
import counts, including the lazy ones inside functions (they still tie the modules together; they only move
the cost to call time).

Modules are named by their path under `pipeline/` (`data.dicom`, `promote.gate`, `cli`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# THE layer order of `pipeline/` (docs/architecture.md shows it): a module may import from its own group and
# from earlier ones, never from a later one. A subpackage is a group by its name; the top-level modules are
# named here, the basics first and the entry points last. A new top-level module must be placed here.
LAYERS: list[tuple[str, frozenset[str] | None]] = [
    ("basics", frozenset({"errors", "files", "stores", "config", "stopping"})),
    ("data", None),  # pipeline/data/: DICOM decoding, labels, TFRecords, the converter, tf.data
    ("net", None),  # pipeline/net/: the CNN family, augmentation, devices, calibration
    ("artifact", None),  # pipeline/artifact/: MLflow logging, the served pyfunc, loading, integrity, tag keys
    ("evaluate", None),  # pipeline/evaluate/: metrics, plots, the shift battery, scoring, Grad-CAM, ledger
    ("study", None),  # pipeline/study/: one training run, Optuna studies, their report
    ("promote", None),  # pipeline/promote/: the gate, the lock, the record, the model card, ensembles
    ("entry", frozenset({"cli", "predict", "serve", "ui", "doctor", "demo", "serving"})),  # serving: a legacy shim
]


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """`data.dicom` -> pipeline/data/dicom.py; packages' `__init__` files are left out."""
    return {".".join(p.relative_to(package).with_suffix("").parts): p for p in sorted(package.rglob("*.py"))
            if p.stem != "__init__"}


def layer_of(module: str) -> int:
    """The index of a module's group in LAYERS (ValueError for a top-level module no group names)."""
    head, _, rest = module.partition(".")
    for i, (name, members) in enumerate(LAYERS):
        if (rest and members is None and name == head) or (not rest and members and module in members):
            return i
    raise ValueError(f"pipeline.{module} belongs to no layer: add it to LAYERS in tests/test_imports.py")


def upward_imports(package: Path = PACKAGE) -> list[str]:
    """'pipeline/<file>:<line>: <module> imports <module> (<group> is after <group>)' for every import, at
    module level or inside a function, of a module in a later group."""
    files = module_names(package)
    found = []
    for name, path in files.items():
        own = layer_of(name)
        for node in ast.walk(ast.parse(path.read_text())):
            for dep in sorted(imported_modules(node, set(files)) - {name}):
                if layer_of(dep) > own:
                    found.append(f"{path.relative_to(package.parent)}:{node.lineno}: {name} imports {dep} "
                                 f"({LAYERS[layer_of(dep)][0]} is after {LAYERS[own][0]})")
    return found


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


def test_the_layer_check_names_the_file_and_line_of_an_upward_import(tmp_path):
    """An injected upward import fails the check, at module level and inside a function."""
    for folder in ("data", "promote"):
        (tmp_path / folder).mkdir()
    (tmp_path / "errors.py").write_text("")
    (tmp_path / "promote" / "gate.py").write_text("from pipeline.data import dicom\n")  # downward: fine
    (tmp_path / "data" / "dicom.py").write_text("import os\n\n\ndef f():\n    from pipeline.promote import gate\n")
    assert upward_imports(tmp_path) == [
        f"{tmp_path.name}/data/dicom.py:5: data.dicom imports promote.gate (promote is after data)"]
    (tmp_path / "data" / "dicom.py").write_text("from pipeline.promote.gate import decide\n")
    assert upward_imports(tmp_path) == [
        f"{tmp_path.name}/data/dicom.py:1: data.dicom imports promote.gate (promote is after data)"]
    (tmp_path / "data" / "dicom.py").write_text("from pipeline.errors import InputError\n")  # basics: fine
    assert upward_imports(tmp_path) == []
    (tmp_path / "helpers.py").write_text("")  # a top-level module no layer names
    with pytest.raises(ValueError, match="pipeline.helpers belongs to no layer"):
        upward_imports(tmp_path)


def test_the_real_dicom_module_importing_the_gate_would_fail(tmp_path):
    """The check on the real tree: a copy of pipeline/ with one lazy upward import added to data/dicom.py."""
    import shutil

    copy = tmp_path / "pipeline"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    dicom = copy / "data" / "dicom.py"
    lines = dicom.read_text().splitlines()
    dicom.write_text("\n".join([*lines, "", "", "def _upward():", "    from pipeline.promote import gate", ""]))
    assert upward_imports(copy) == [f"pipeline/data/dicom.py:{len(lines) + 4}: data.dicom imports promote.gate "
                                     "(promote is after data)"]


def test_pipeline_imports_only_from_its_own_layer_or_earlier():
    assert {LAYERS[layer_of(m)][0] for m in import_graph()} == {name for name, _ in LAYERS}, "every group is used"
    found = upward_imports()
    assert not found, "imports from a later layer:\n" + "\n".join(found)
