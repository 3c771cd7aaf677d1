"""``plugin/vidpar`` has no import cycle: every import counts, the ones under
``if TYPE_CHECKING:`` and inside functions included (read from the source with ``ast``)."""

from __future__ import annotations

import ast
from pathlib import Path

import vidpar

PACKAGE = Path(vidpar.__file__).parent


def module_names() -> dict[str, Path]:
    """``{"vidpar.distributed.state": path, ...}`` for every module of the package."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("vidpar", *path.relative_to(PACKAGE).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its source: for each import the
    deepest module it names (``from vidpar.nn import attention`` is ``vidpar.nn.attention``;
    ``from vidpar.nn import DistributedAttention`` is the package ``vidpar.nn``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            deepest = next(
                (
                    ".".join(parts[:end])
                    for end in range(len(parts), 0, -1)
                    if ".".join(parts[:end]) in modules
                ),
                None,
            )
            if deepest is not None:
                found.add(deepest)
    found.discard(name)
    return found


def import_cycles() -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan), each sorted."""
    names = module_names()
    graph = {n: imports_of(n, p, set(names)) for n, p in names.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                cycles.append(sorted(members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_graph_sees_imports_in_functions_and_type_checking_blocks() -> None:
    names = module_names()
    dit = imports_of("vidpar.benchmarks.dit", names["vidpar.benchmarks.dit"], set(names))
    assert "vidpar.nn.dit" in dit
    relative = imports_of("vidpar.nn", names["vidpar.nn"], set(names))
    assert "vidpar.nn.attention" in relative


def test_no_import_cycle_in_the_package() -> None:
    assert import_cycles() == []
