"""The package's layers: imports flow one way, and no module imports itself in a circle.

protocol <- errors, tasks <- observe, client <- backends <- settings <- engine <- web <- app
<- cli, testing <- the package's face. The engine sees the backends' contracts
(`base.py`) only: the app wires in the concrete backends. Read from the source
with `ast`, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "service"
PACKAGE = "roomcast"

# Lower ranks are imported by higher ones, never the other way round.
RANKS = {
    "protocol": 0,
    "errors": 1,
    "envelopes": 1,
    "tasks": 1,
    "observe": 2,
    "client": 2,
    "backends": 3,
    "settings": 4,
    "engine": 5,
    "web": 6,
    "app": 7,
    "cli": 8,
    "testing": 8,
    "__init__": 9,
    "__main__": 9,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join([PACKAGE, *parts]) if parts != ["__init__"] else PACKAGE


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


MODULES = {module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The roomcast modules `name` imports (a `from x import y` of a module y counts as y)."""
    path = MODULES[name]
    package = name if is_package(path) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            elif (node.module or "").split(".")[0] == PACKAGE:
                target = node.module or ""
            else:
                continue
            for alias in node.names:
                child = f"{target}.{alias.name}"
                found.add(child if child in MODULES else target)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer() -> None:
    assert {layer(m) for m in MODULES} <= set(RANKS), {layer(m) for m in MODULES} - set(RANKS)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_flow_down(name: str) -> None:
    mine = RANKS[layer(name)]
    upward = sorted(m for m in GRAPH[name] if layer(m) != layer(name) and RANKS[layer(m)] >= mine)
    assert not upward, f"{name} ({layer(name)}) imports {upward}, which are not below it"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if layer(m) == "engine"))
def test_the_engine_sees_only_the_backends_contracts(name: str) -> None:
    concrete = sorted(m for m in GRAPH[name] if layer(m) == "backends" and not m.endswith(".base"))
    assert not concrete, f"{name} imports concrete backends {concrete}: let the app wire them"


def test_the_client_needs_only_the_protocol() -> None:
    for name in (m for m in MODULES if layer(m) == "client"):
        assert {layer(m) for m in GRAPH[name]} <= {"client", "protocol", "errors"}, name


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles() -> None:
    assert not circles(GRAPH)


def test_the_checks_see_what_they_look_for() -> None:
    """A circle, and the imports that resolve (relative, `from . import x`)."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    assert "roomcast.engine.hub" in GRAPH["roomcast.app"]
    assert "roomcast.observe.metrics" in GRAPH["roomcast.engine.hub"]  # from ..observe import x
    assert "roomcast.protocol.envelopes" in GRAPH["roomcast.engine.hub"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_readable_in_one_sitting(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= 400, f"{name} has {lines} lines: split it where a second noun appears"
