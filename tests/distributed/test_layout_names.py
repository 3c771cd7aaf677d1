"""The layout's dimension names and their order are spelled once (``vidpar.config.DIMS``);
every group name has a plain, documented ``get_<name>_group()`` getter."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import vidpar
from vidpar import distributed
from vidpar.config import DIMS, GROUP_DIMS, ParallelConfig
from vidpar.distributed import state as ps

PACKAGE = Path(vidpar.__file__).parent
#: Where the names may stand by hand: the constant, and the strategy's keyword arguments
#: (Lightning's ``VidParStrategy(tp=2, ...)`` is public API).
ALLOWED = {"config.py", "lightning/strategy.py"}
_ORDER = re.compile(r"\W+".join(rf"\b{d}\b" for d in DIMS))


def _docstrings(tree: ast.Module) -> set[int]:
    nodes = [tree, *ast.walk(tree)]
    return {
        id(node.body[0].value)
        for node in nodes
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }


def spelled_by_hand(source: str) -> list[int]:
    """Lines of code (not docstrings or comments) that spell three or more layout names in
    one literal collection, or the whole order in one string."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set | ast.Dict):
            items = node.keys if isinstance(node, ast.Dict) else node.elts
            names = {i.value for i in items if isinstance(i, ast.Constant) and i.value in DIMS}
            if len(names) >= 3:
                lines.append(node.lineno)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docs
            and _ORDER.search(node.value)
        ):
            lines.append(node.lineno)
    return lines


def test_the_check_finds_names_spelled_by_hand() -> None:
    assert spelled_by_hand('X = ("tp", "ring", "dp")\nY = {"cfg": 1, "ulysses": 2, "tp": 1}')
    assert spelled_by_hand('print("world = dp × cfg × ring × ulysses × tp")')
    assert not spelled_by_hand('"""world = dp × cfg × ring × ulysses × tp"""\nX = ("tp", 1)')


def test_layout_names_are_spelled_only_in_config() -> None:
    found = {
        str(path.relative_to(PACKAGE)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if (lines := spelled_by_hand(path.read_text()))
    }
    assert set(found) <= ALLOWED, {k: v for k, v in found.items() if k not in ALLOWED}


def test_every_group_has_a_plain_documented_getter() -> None:
    tree = ast.parse(Path(ps.__file__).read_text())
    defined = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for name in GROUP_DIMS:
        getter = getattr(distributed, f"get_{name}_group")
        assert getter.__name__ in defined and ast.get_docstring(defined[getter.__name__]), name
        assert getter() is ps.get_parallel_state().group(name)


def test_describe_and_the_mesh_order_follow_dims() -> None:
    layout = ParallelConfig(tp=2, ring=3, cfg=2, dp=1)
    assert list(layout.sizes) == list(DIMS)
    assert layout.describe() == "dp1 × cfg2 × ring3 × ulysses1 × tp2 = 12"
