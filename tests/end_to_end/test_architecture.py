"""docs/ARCHITECTURE.md's map names every module of ``plugin/vidpar`` with its purpose, and
nothing else."""

from __future__ import annotations

import re
from pathlib import Path

import vidpar

PACKAGE = Path(vidpar.__file__).parent
MAP = PACKAGE.parents[1] / "docs" / "ARCHITECTURE.md"
#: A row of the map: ``| `distributed/state.py` | its purpose |``.
ROW = re.compile(r"^\| `(?P<path>[\w/]+\.py)` \| (?P<purpose>[^|].*?) \|$")


def map_rows(text: str) -> dict[str, str]:
    """``{module path: purpose}`` of the rows in the map's "Rooms" section."""
    rooms = text.split("\n## Rooms", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in rooms.splitlines():
        if match := ROW.match(line):
            assert match["path"] not in rows, f"{match['path']} has two rows"
            rows[match["path"]] = match["purpose"]
    return rows


def package_modules() -> set[str]:
    """Every module's path under ``plugin/vidpar`` (packages' ``__init__.py`` aside)."""
    return {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    }


def test_rows_are_parsed() -> None:
    rows = map_rows("x\n## Rooms\n| `a/b.py` | one thing |\n| `c.py` |  |\n## Next\n| `d.py` | x |")
    assert rows == {"a/b.py": "one thing"}


def test_every_module_has_a_row_and_every_row_a_module() -> None:
    rows = map_rows(MAP.read_text())
    modules = package_modules()
    assert sorted(modules - set(rows)) == [], "add a row to docs/ARCHITECTURE.md for these"
    assert sorted(set(rows) - modules) == [], "docs/ARCHITECTURE.md names modules that are gone"
