"""The import graph: one way only, layers kept, no cycle (``TYPE_CHECKING`` imports count).

Every ``import`` statement anywhere in a module counts, inside functions and
``if TYPE_CHECKING:`` blocks included: a cycle hidden from the interpreter is still a
cycle for a reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("config", "schemas", "service", "workers")


def module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for folder in FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            parts = ["mlgate", *path.relative_to(REPO).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def imported_modules(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                yield submodule if submodule in MODULES else node.module


def project_edges() -> dict[str, set[str]]:
    return {
        module: {name for name in imported_modules(path) if name in MODULES and name != module}
        for module, path in MODULES.items()
    }


EDGES = project_edges()


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in EDGES[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in EDGES:
        if module not in index:
            visit(module)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    assert cycles() == []


def test_every_project_import_goes_through_the_mlgate_namespace() -> None:
    bare = {
        (module, name)
        for module, path in MODULES.items()
        for name in imported_modules(path)
        if name.split(".")[0] in FOLDERS
    }
    assert bare == set()


@pytest.mark.parametrize(
    ("layer", "allowed"),
    [
        ("mlgate.config", {"mlgate.config"}),
        ("mlgate.schemas", {"mlgate.schemas"}),
        ("mlgate.workers", {"mlgate.workers", "mlgate.config", "mlgate.schemas"}),
    ],
)
def test_a_lower_layer_imports_nothing_above_it(layer: str, allowed: set[str]) -> None:
    breaks = {
        (module, target)
        for module, targets in EDGES.items()
        if module == layer or module.startswith(layer + ".")
        for target in targets
        if not any(target == base or target.startswith(base + ".") for base in allowed)
    }
    assert breaks == set()


def test_route_modules_do_not_import_each_other() -> None:
    routes = "mlgate.service.routes."
    crossings = {
        (module, target)
        for module, targets in EDGES.items()
        if module.startswith(routes)
        for target in targets
        if target.startswith(routes)
    }
    assert crossings == set()


def reachable(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in EDGES[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_state_registry_reaches_no_middleware_route_or_key_reader() -> None:
    """AppKeys name the types of the stores they hold; nothing the registry imports, even
    indirectly, reads a key back: no middleware, no route, no lifecycle."""
    readers = {
        module
        for module, targets in EDGES.items()
        if "mlgate.service.state" in targets
    }
    assert reachable("mlgate.service.state") & readers == set()
