"""The arrows between the project's parts point one way (DESIGN.md), checked on the source.

Every import counts, also those inside functions (they run just the same, only later). A part
is a package of the library (``ray_pipeline.teacher``), a top-level module of it
(``ray_pipeline.run_state``), or ``serve_apps`` / ``jobs``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ray_pipeline", "serve_apps", "jobs")
# The loop, in order: a stage may import an earlier one, never a later one.
STAGES = ("generate", "curate", "train", "sweep", "evaluate", "serving")
# Below every stage: what the stages share. Above: what runs them.
BELOW = ("storage", "config", "data", "teacher", "run_state", "runtime", "report")
ABOVE = ("pipeline", "cli")


def module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {
        module_of(p): p
        for pkg in PACKAGES
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if ".venv" not in p.parts
    }


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules `module` imports, anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a.b import c` imports the module a.b.c when there is one, else a.b.
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for name in names:
            # The longest project module the name starts with.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def part(module: str) -> str:
    top, _, rest = module.partition(".")
    if top != "ray_pipeline":
        return top
    return rest.partition(".")[0] or "ray_pipeline"


def module_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {m: imports_of(p, m, known) for m, p in modules.items()}


def part_edges(graph: dict[str, set[str]]) -> set[tuple[str, str, str, str]]:
    """(from part, to part, from module, to module) for every import across parts."""
    return {
        (part(m), part(n), m, n)
        for m, targets in graph.items()
        for n in targets
        if part(m) != part(n)
    }


def back_arrows(edges) -> list[str]:
    """Imports that point the wrong way: a stage importing a later stage (or what runs the
    stages); a shared part importing a stage or what runs them; the library importing
    `jobs` or `serve_apps`."""
    bad = []
    for a, b, m, n in edges:
        if a in STAGES and b in STAGES and STAGES.index(b) > STAGES.index(a):
            bad.append(f"{m} -> {n}: the {a} stage imports the later {b} stage")
        elif a in STAGES + BELOW and b in ABOVE:
            bad.append(f"{m} -> {n}: {a} imports {b}, which runs it")
        elif a in BELOW and b in STAGES:
            bad.append(f"{m} -> {n}: {a} is below the stages and imports the {b} stage")
        elif m.startswith("ray_pipeline") and b in ("jobs", "serve_apps"):
            bad.append(f"{m} -> {n}: the library imports {b} (deploy by import path instead)")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def parts_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for a, b, _, _ in part_edges(graph):
        out[a].add(b)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return module_graph()


def test_the_walk_sees_the_projects_imports(graph):
    # A check that finds nothing because it reads nothing would pass: make sure it reads.
    assert "ray_pipeline.run_state" in graph["ray_pipeline.curate.stage"]
    assert "ray_pipeline.teacher.session" in graph["ray_pipeline.pipeline"]  # a lazy import
    assert "ray_pipeline.train.stage" in graph["ray_pipeline.sweep.stage"]
    assert "ray_pipeline.cli" in graph["jobs.train"]


def test_no_import_points_back(graph):
    assert back_arrows(part_edges(graph)) == []


def test_no_import_cycles_between_parts_or_modules(graph):
    assert cycles(parts_graph(graph)) == []
    assert cycles(graph) == []


def test_config_and_the_run_report_import_nothing_of_ours_but_storage_and_config(graph):
    # storage (paths and URIs through pyarrow) is the floor: it imports nothing of ours
    assert graph["ray_pipeline.storage"] == set()
    assert graph["ray_pipeline.config"] == {"ray_pipeline.storage"}
    assert graph["ray_pipeline.report"] == set()
    assert {part(n) for n in graph["ray_pipeline.run_state"]} <= {"storage", "config", "report"}


def test_the_checks_catch_what_they_look_for():
    edges = {
        ("generate", "evaluate", "ray_pipeline.generate.stage", "ray_pipeline.evaluate.stage"),
        ("data", "teacher", "ray_pipeline.data.x", "ray_pipeline.teacher.y"),
        ("teacher", "generate", "ray_pipeline.teacher.y", "ray_pipeline.generate.stage"),
        ("serving", "serve_apps", "ray_pipeline.serving.stage", "serve_apps.router"),
        ("train", "cli", "ray_pipeline.train.stage", "ray_pipeline.cli"),
        ("evaluate", "train", "ray_pipeline.evaluate.stage", "ray_pipeline.train.stage"),  # fine
    }
    assert len(back_arrows(edges)) == 4
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
