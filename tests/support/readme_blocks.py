"""README.md's code blocks, run as a new user runs them: in order, in one folder, bash
blocks with ``bash -e`` and python blocks as script files with this interpreter.

Blocks that install vidpar or run the suite (:data:`CI_ONLY`) are never run here (that
would change the environment the tests run in): :func:`ci_commands` reads what ``.ci/run``
runs, for the tests to compare them with. :class:`ReadmeRun` runs every other block at most
once per session and keeps the outcomes, so the quick start (the default job) serves every
test that needs it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
#: The quick start: the default job, then generation from its checkpoint.
QUICK_START = "vidpar-train && vidpar-generate"
#: A block mentioning one of these is CI's to run (install, or the suite itself).
CI_ONLY = ("pip install", "pytest")
LANGUAGES = ("bash", "python")
#: Kill a block still running after this long (the tests using it allow 3000 s).
BLOCK_TIMEOUT_S = 2900


@dataclass(frozen=True)
class Block:
    """A fenced code block of the README."""

    language: str
    code: str
    line: int  # of the opening fence, from 1

    @property
    def name(self) -> str:
        return f"line{self.line}-{self.language}"

    @property
    def ci_only(self) -> bool:
        return any(word in self.code for word in CI_ONLY)


def readme_blocks(path: Path = README) -> list[Block]:
    """Every fenced code block of ``path``, in order."""
    tokens = MarkdownIt().parse(path.read_text())
    return [Block(t.info.strip(), t.content, t.map[0] + 1) for t in tokens if t.type == "fence"]


def inline_commands(programs: tuple[str, ...], path: Path = README) -> list[str]:
    """The inline code spans of ``path`` (outside the blocks) that run one of ``programs``."""
    found: list[str] = []
    for token in MarkdownIt().parse(path.read_text()):
        for child in token.children or []:
            text = " ".join(child.content.split())
            if child.type == "code_inline" and text.split()[0] in programs and text not in found:
                found.append(text)
    return found


def ci_commands(path: Path = CI_SCRIPT) -> list[list[str]]:
    """The commands ``.ci/run`` runs (without shell set-up, the fresh virtual environment
    it makes and enters, and ``--quiet``), as words."""
    commands = []
    for line in path.read_text().splitlines():
        words = [w for w in shlex.split(line, comments=True) if w != "--quiet"]
        setup = words[:1] in (["set"], ["cd"], ["trap"], ["source"]) or words[:3] == [
            "python",
            "-m",
            "venv",
        ]
        if words and not setup and "=" not in words[0]:
            commands.append(words)
    return commands


def readme_ci_commands(path: Path = README) -> list[list[str]]:
    """The commands of the README's CI-only blocks, as words."""
    return [
        shlex.split(line)
        for block in readme_blocks(path)
        if block.ci_only
        for line in block.code.splitlines()
        if line.strip()
    ]


@dataclass(frozen=True)
class Outcome:
    block: Block
    returncode: int | None  # None: killed after BLOCK_TIMEOUT_S
    output: str  # stdout and stderr, interleaved
    seconds: float

    def report(self, lines: int = 60) -> str:
        """What a failed block said, for an assertion message."""
        status = "timed out" if self.returncode is None else f"exited {self.returncode}"
        tail = "\n".join(self.output.splitlines()[-lines:])
        return f"README.md line {self.block.line} ({self.block.language}) {status} after {self.seconds:.0f} s:\n{tail}"

    def printed(self, pattern: str) -> list[str]:
        """The first group of every output line matching ``pattern``."""
        return re.findall(pattern, self.output, flags=re.MULTILINE)


class ReadmeRun:
    """The README's runnable blocks, run in order in ``folder`` (scripts kept in
    ``scripts``), each at most once; :meth:`through` runs those not run yet up to one."""

    def __init__(self, folder: Path, scripts: Path) -> None:
        self.folder, self.scripts = folder, scripts
        self.blocks = [b for b in readme_blocks() if not b.ci_only]
        self.outcomes: list[Outcome] = []

    def through(self, block: Block) -> Outcome:
        """The outcome of ``block``, after running every block before it."""
        index = self.blocks.index(block)
        while len(self.outcomes) <= index:
            self.outcomes.append(self._run(self.blocks[len(self.outcomes)]))
        return self.outcomes[index]

    def quick_start(self) -> Outcome:
        matches = [b for b in self.blocks if b.code.strip() == QUICK_START]
        assert len(matches) == 1, f"README.md needs one block that is exactly {QUICK_START!r}"
        return self.through(matches[0])

    def failed_before(self, block: Block) -> list[str]:
        """The blocks before ``block`` that failed (a later one may fail because of them)."""
        index = self.blocks.index(block)
        return [o.block.name for o in self.outcomes[:index] if o.returncode != 0]

    def _run(self, block: Block) -> Outcome:
        if block.language not in LANGUAGES:
            return Outcome(block, -1, f"unknown language {block.language!r}: {LANGUAGES}", 0.0)
        script = self.scripts / f"{block.name}.{'sh' if block.language == 'bash' else 'py'}"
        script.write_text(block.code)
        command = ["bash", "-e", str(script)] if block.language == "bash" else [sys.executable]
        if block.language == "python":
            command.append(str(script))
        # This interpreter's scripts (vidpar-train, torchrun, python) first, as in its venv.
        path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
        start = time.monotonic()
        process = subprocess.Popen(
            command,
            cwd=self.folder,
            env={**os.environ, "PATH": path},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group, to stop it whole
        )
        try:
            output, _ = process.communicate(timeout=BLOCK_TIMEOUT_S)
            returncode: int | None = process.returncode
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            output, returncode = process.communicate()[0], None
        except BaseException:  # e.g. pytest-timeout: leave nothing running
            _kill_group(process.pid)
            process.wait()
            raise
        return Outcome(block, returncode, output, time.monotonic() - start)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
