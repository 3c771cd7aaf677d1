"""The tests mirror the package: each test file in the folder of the sub-package it tests
(``tests/end_to_end/`` for the whole package's), helpers in ``tests/support/``, nothing
else at ``tests/`` root but ``conftest.py``."""

from __future__ import annotations

from pathlib import Path

import vidpar

PACKAGE = Path(vidpar.__file__).parent
TESTS = Path(__file__).resolve().parents[1]
#: Test folders that name no sub-package: the whole package's tests, and the helpers.
OTHER_TEST_FOLDERS = {"end_to_end", "support"}


def misplaced_tests(tests: Path, package: Path) -> list[str]:
    """What breaks the tests' mirror of the package: a file at ``tests/`` root other than
    ``conftest.py``, a folder that names no sub-package (nor end_to_end/support), a test
    file among the helpers of ``support/``."""
    rooms = {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    problems = []
    for path in sorted(tests.iterdir()):
        if path.name.startswith((".", "__")):
            continue
        if path.is_file() and path.name != "conftest.py":
            problems.append(f"{path.name}: move it into the folder of what it tests")
        elif path.is_dir() and path.name not in rooms | OTHER_TEST_FOLDERS:
            problems.append(f"{path.name}/: name a package folder ({', '.join(sorted(rooms))})")
    problems += [
        f"support/{p.name}: a test among the helpers" for p in tests.glob("support/test_*.py")
    ]
    return problems


def test_misplaced_tests_are_named(tmp_path) -> None:
    package, tests = tmp_path / "vidpar", tmp_path / "tests"
    for folder in (package / "nn", tests / "nn", tests / "support", tests / "misc"):
        folder.mkdir(parents=True)
    (package / "nn" / "__init__.py").touch()
    for name in ("conftest.py", "test_loose.py", "nn/test_ok.py", "support/test_helper.py"):
        (tests / name).touch()
    assert [p.split(":")[0] for p in misplaced_tests(tests, package)] == [
        "misc/",
        "test_loose.py",
        "support/test_helper.py",
    ]


def test_tests_mirror_the_package() -> None:
    assert misplaced_tests(TESTS, PACKAGE) == []
