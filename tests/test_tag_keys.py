"""Tag keys are written and read only through pipeline/artifact/tag_keys.py: a bare string equal to one of its
values, used where a tag is written or read, fails here with its file and line.

Where a tag is used, read from the code's shape (an AST scan, so strings in comments and docs do not count):
- an argument of `set_tag`, `set_tags`, `set_model_version_tag`, `delete_model_version_tag`, `delete_tag`;
- a subscript or `.get(...)` of something named `tags` or ending in `tags` (`mv.tags["threshold"]`,
  `run.data.tags.get("study")`, `own_tags["kind"]`);
- a key of a dict literal passed as `tags=` or bound to a name ending in `tags`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.artifact import tag_keys

ROOT = Path(__file__).resolve().parents[1]
KEYS = {v for k, v in vars(tag_keys).items() if k.isupper() and isinstance(v, str)}
WRITERS = {"set_tag", "set_tags", "set_model_version_tag", "delete_model_version_tag", "delete_tag"}


def _tagsish(node: ast.AST) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return name == "tags" or name.endswith("_tags") or name.endswith("tags")


def _literal_keys(node: ast.AST):
    if isinstance(node, ast.Dict):
        for key in node.keys:
            if isinstance(key, ast.Constant) and key.value in KEYS:
                yield key


def bare_tag_keys(source: str, filename: str) -> list[str]:
    """'file:line: "key"' for every bare tag key used as a tag in `source`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        hits = []
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in WRITERS:
                hits += [a for a in node.args if isinstance(a, ast.Constant) and a.value in KEYS]
                for a in node.args:
                    hits += list(_literal_keys(a))
            if name == "get" and isinstance(func, ast.Attribute) and _tagsish(func.value) and node.args:
                hits += [node.args[0]] if isinstance(node.args[0], ast.Constant) and node.args[0].value in KEYS else []
            for kw in node.keywords:
                if kw.arg == "tags":
                    hits += list(_literal_keys(kw.value))
        elif isinstance(node, ast.Subscript) and _tagsish(node.value):
            if isinstance(node.slice, ast.Constant) and node.slice.value in KEYS:
                hits.append(node.slice)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(_tagsish(t) for t in targets) and node.value is not None:
                hits += list(_literal_keys(node.value))
        found += [f"{filename}:{h.lineno}: {h.value!r}" for h in hits]
    return sorted(set(found))


def test_the_scan_finds_bare_keys_and_passes_constants():
    bad = ("client.set_model_version_tag(m, v, 'threshold', '0.5')\n"
           "t = mv.tags['dataset_digest']\n"
           "s = run.data.tags.get('study')\n"
           "tags = {'kind': 'ensemble'}\n"
           "mlflow.start_run(tags={'temperature': '1.0'})\n")
    assert [f.split(": ")[1] for f in bare_tag_keys(bad, "x.py")] == [
        "'threshold'", "'dataset_digest'", "'study'", "'kind'", "'temperature'"]
    good = ("client.set_model_version_tag(m, v, tag_keys.THRESHOLD, '0.5')\n"
            "t = mv.tags[tag_keys.DATASET_DIGEST]\n"
            "metrics['threshold'] = 0.5\n")  # a metric of the same name is not a tag
    assert bare_tag_keys(good, "y.py") == []


@pytest.mark.parametrize("folder", ["pipeline", "benchmarks"])
def test_no_module_uses_a_bare_tag_key(folder):
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if path.name == "tag_keys.py":
            continue
        found += bare_tag_keys(path.read_text(), str(path.relative_to(ROOT)))
    assert found == [], "use pipeline.artifact.tag_keys:\n" + "\n".join(found)
