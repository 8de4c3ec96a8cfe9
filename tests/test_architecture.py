"""The package's shape, checked: no import cycle, short classes and functions, no private
Celery state. ``docs/architecture.md`` describes the layers these keep visible."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "celery_concurrent"
MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def _type_checking_only(tree: ast.Module) -> set[int]:
    nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            nodes.update(id(sub) for sub in ast.walk(node))
    return nodes


def runtime_imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package modules ``name`` imports when it is imported (not for type checking)."""
    skip = _type_checking_only(tree)
    is_package = name == "celery_concurrent" or f"{name}.__init__" in known
    deps = set()
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom | ast.Import):
            continue
        if isinstance(node, ast.Import):
            deps.update(a.name for a in node.names if a.name in known)
            continue
        base = name.split(".") if is_package else name.split(".")[:-1]
        if node.level:
            base = base[: len(base) - node.level + 1]
            target = ".".join([*base, *([node.module] if node.module else [])])
        else:
            target = node.module or ""
        if target in known:
            deps.add(target)
        deps.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known)
    return deps - {name}


def test_the_package_has_no_import_cycle():
    trees = modules()
    known = set(trees)
    graph = {name: runtime_imports(name, tree, known) for name, tree in trees.items()}
    # A package's __init__ importing its own submodules is not a cycle between layers.
    graph = {n: {d for d in deps if not n.startswith(f"{d}.")} for n, deps in graph.items()}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycle = path[path.index(dep) :] + [dep] if dep in path else [node, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize(
    ("side", "other"),
    [
        ("celery_concurrent.supervisor", "celery_concurrent.container"),
        ("celery_concurrent.container", "celery_concurrent.supervisor"),
    ],
)
def test_the_supervisor_and_container_sides_never_import_each_other(side: str, other: str):
    trees = modules()
    known = set(trees)
    crossing = sorted(
        f"{name} -> {dep}"
        for name, tree in trees.items()
        if name.startswith(side)
        for dep in runtime_imports(name, tree, known)
        if dep.startswith(other)
    )
    assert crossing == []


def test_no_class_or_function_of_the_package_is_too_long():
    too_long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                if lines > limit:
                    too_long.append(f"{name}.{node.name}: {lines} lines (limit {limit})")
    assert too_long == []


@pytest.mark.parametrize("private", ["_Proxy__", "_state._tls", "_state.default_app"])
def test_the_package_reads_no_private_celery_state(private: str):
    offenders = [
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if private in path.read_text()
    ]
    assert offenders == []
