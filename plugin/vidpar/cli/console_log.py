"""The console of a vidpar command, line for line in its job's log file.

The Trainer's workers and W&B's service write to the stdout and stderr they inherit, where
Python logging in the main process never sees them. :func:`console_transcript` puts a pipe
under file descriptors 1 and 2 of this process once (every process started afterwards
inherits them); a thread per pipe passes what arrives on to the real stream and, while a
job records (:meth:`ConsoleTranscript.recording`), to its log file as plain lines:
progress-bar redraws collapsed to their last state, ANSI escapes removed. A console that
is not a terminal gets the same plain lines; a terminal gets the live bytes. Lines of
:data:`KNOWN_NOISE` reach neither.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

ANSI_ESCAPE = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")

#: Lines that third-party libraries print on every run and a vidpar user can do nothing
#: about, each with who prints it and why.
KNOWN_NOISE = tuple(
    re.compile(pattern)
    for pattern in (
        # Lightning's advert for its LitLogger, printed when a Trainer has another logger.
        rb"^\W*Tip: For seamless cloud logging and experiment tracking, try installing",
        # W&B >= 0.19 warns about `anonymous`, which Lightning's WandbLogger always passes.
        rb"^wandb: WARNING The anonymous setting has no effect",
        # Lightning's WandbLogger calls wandb.require("service"), a no-op since W&B 0.18.
        rb"^wandb: WARNING `wandb\.require\('service'\)` is a no-op",
    )
)

#: Written into a pipe to learn when everything written before it has been passed on.
_SYNC = b"\x00vidpar-console-sync\x00"


def plain(line: bytes) -> bytes:
    """What a terminal would leave of ``line``: escapes removed, and of the redraws that a
    carriage return starts, the last that is not blank."""
    drawn = [part for part in ANSI_ESCAPE.sub(b"", line).split(b"\r") if part.strip()]
    return drawn[-1].rstrip() if drawn else b""


def last_redraws(line: bytes) -> bytes:
    """Of a line that carriage returns redraw, what :func:`plain` needs: the last draw that
    is not blank and what was written after it."""
    *drawn, current = line.split(b"\r")
    if current.strip() or not (kept := [part for part in drawn if part.strip()]):
        return b"\r" + current
    return b"\r" + kept[-1] + b"\r" + current


def is_noise(line: bytes) -> bool:
    return any(pattern.search(line) for pattern in KNOWN_NOISE)


class _Tee:
    """One file descriptor's pipe and the thread that empties it."""

    def __init__(self, fd: int, transcript: ConsoleTranscript) -> None:
        self.console = os.dup(fd)
        self.live = os.isatty(self.console)
        read, write = os.pipe()
        os.dup2(write, fd)
        os.close(write)
        self.fd, self.read, self.transcript = fd, read, transcript
        self.pending = b""  # the current line, not yet complete
        self.shown = 0  # how much of it a live console has already got
        self.synced = threading.Condition()
        self.syncs_seen = 0
        threading.Thread(target=self._pump, name=f"vidpar-console-{fd}", daemon=True).start()

    def _pump(self) -> None:
        while chunk := os.read(self.read, 1 << 16):
            data = self.pending + chunk
            syncs = data.count(_SYNC)
            lines = data.replace(_SYNC, b"").split(b"\n")
            self.pending = lines.pop()
            for line in lines:
                self._line(line)
            if syncs or (self.live and b"\r" in self.pending):  # a redraw: show it now
                self._show(self.pending[self.shown :])
                self.shown = len(self.pending)
            if b"\r" in self.pending and b"\x00" not in self.pending:
                self.pending = last_redraws(self.pending)
                self.shown = len(self.pending)
            if syncs:
                if self.pending:  # a line left open (a bar's last draw) ends with the job
                    self._line(self.pending, shown_already=True)
                    self.pending = b""
                with self.synced:
                    self.syncs_seen += syncs
                    self.synced.notify_all()

    def _line(self, line: bytes, shown_already: bool = False) -> None:
        shown, self.shown = self.shown, 0
        if is_noise(line):
            return
        text = plain(line)
        if self.live and not shown_already:
            self._show(line[shown:] + b"\n")
        elif not self.live and (text or not line):
            self._show(text + b"\n")
        if text or not line:
            self.transcript.write(text + b"\n")

    def _show(self, data: bytes) -> None:
        if data and (self.live or b"\n" in data):
            with contextlib.suppress(OSError):
                os.write(self.console, data)

    def sync(self, timeout: float = 5.0) -> None:
        """Return once everything written to the descriptor so far has been passed on."""
        with self.synced:
            target = self.syncs_seen + 1
            os.write(self.fd, _SYNC)
            self.synced.wait_for(lambda: self.syncs_seen >= target, timeout)

    def restore(self) -> None:
        """The descriptor back on the real stream."""
        os.dup2(self.console, self.fd)


class ConsoleTranscript:
    """Descriptors 1 and 2 of this process through a :class:`_Tee` each (see the module)."""

    def __init__(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        # Every line in order: this process's Python streams (and children started from
        # now on, Python or not) write through at once rather than when a buffer fills.
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(line_buffering=True)
        self._lock = threading.Lock()
        self._file: BinaryIO | None = None
        self._tees = [_Tee(1, self), _Tee(2, self)]
        atexit.register(self.close)

    def write(self, line: bytes) -> None:
        with self._lock:
            if self._file is not None:
                self._file.write(line)
                self._file.flush()

    def sync(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(ValueError, OSError):
                stream.flush()
        for tee in self._tees:
            tee.sync()

    def close(self) -> None:
        """Pass on what is still in the pipes and put the real streams back (at exit)."""
        self.sync()
        for tee in self._tees:
            tee.restore()

    @contextlib.contextmanager
    def recording(self, path: Path) -> Iterator[None]:
        """Everything the console shows meanwhile is appended to ``path`` too."""
        self.sync()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as file:
            with self._lock:
                self._file = file
            try:
                yield
            finally:
                self.sync()
                with self._lock:
                    self._file = None


_transcript: ConsoleTranscript | None = None


def console_transcript() -> ConsoleTranscript:
    """This process's :class:`ConsoleTranscript`, started on the first call."""
    global _transcript
    if _transcript is None:
        _transcript = ConsoleTranscript()
    return _transcript
