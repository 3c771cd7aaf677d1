"""How worker processes start: forked from a server that has torch (and Lightning) loaded.

Importing torch and Lightning costs seconds of CPU in every new Python process, which a
world of spawned workers pays once per worker. multiprocessing's ``forkserver`` pays it
once per calling process: a server imports them, and each worker is a fork of it. A forked
worker inherits the server's state from when the server started rather than the caller's
state now; :class:`CallerState` carries the caller's environment, stdout and stderr
across (multiprocessing's own preparation data carries the working directory and
``sys.path``), so a worker starts as a spawned one would. ``VIDPAR_START_METHOD=spawn``
spawns every worker afresh instead.

A new worker runs the caller's main script again (as ``__mp_main__``) to find what it
defines; a script read from standard input (``python -``) has no file to run again, so its
workers start as those of ``python -c`` do, without it (:func:`main_script_runnable`).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing import forkserver
from multiprocessing.context import BaseContext

START_METHOD_ENV = "VIDPAR_START_METHOD"
#: The server imports these when the caller has (torch always): what workers unpickle.
PRELOAD = ("torch", "lightning.pytorch", "vidpar.lightning", "vidpar.pipelines", "vidpar.models")
#: The server imports these too where the caller has: the diffusers and transformers model
#: code that a worker building or unpickling a diffusers model would import again (seconds
#: of CPU per worker). Not on a host with CUDA GPUs (:func:`server_preload`).
PRELOAD_IF_IMPORTED = (
    "diffusers.models.transformers",
    "diffusers.models.autoencoders",
    "transformers.modeling_utils",
)
#: The server alone imports this, first: it ignores SIGTERM and drops the caller's output.
SERVER_SETUP = "vidpar.executor.server_setup"
#: The top-level packages a server on a host with CUDA GPUs preloads: those whose import
#: is known to leave CUDA alone (forked workers use the GPU in the GPU tests).
CUDA_SAFE_PRELOAD = ("torch", "lightning", "vidpar")


def start_method() -> str:
    """``forkserver`` on Linux, else ``spawn``; ``VIDPAR_START_METHOD`` chooses."""
    methods = ("forkserver", "spawn")
    chosen = os.environ.get(START_METHOD_ENV)
    if chosen is None:  # forked workers watch their caller through a pidfd: Linux
        return "forkserver" if sys.platform.startswith("linux") else "spawn"
    if chosen not in methods or chosen not in mp.get_all_start_methods():
        raise ValueError(
            f"{START_METHOD_ENV}={chosen!r}: choose one of "
            f"{', '.join(m for m in methods if m in mp.get_all_start_methods())}"
        )
    return chosen


def server_preload(preload: Sequence[str] | None = None) -> list[str]:
    """What a fork server yet to start imports, in order: :data:`SERVER_SETUP`, ``preload``
    (by default what the caller has imported of :data:`PRELOAD`, torch always), then what
    the caller has imported of :data:`PRELOAD_IF_IMPORTED`.

    On a host with CUDA GPUs, only the packages of :data:`CUDA_SAFE_PRELOAD`: a module
    whose import asks CUDA anything leaves the server's forks unable to use CUDA ("Cannot
    re-initialize CUDA in forked subprocess"). On an H100, workers forked from a server
    that had preloaded diffusers and transformers failed so; those of a server with torch,
    Lightning and vidpar alone use the GPU (the GPU tests, the prompt-to-video benchmark).
    Which import was at fault is not known: on the same H100 each of them, imported in one
    process and forked, left the fork's CUDA usable. Workers import the rest themselves."""
    if preload is None:
        preload = [m for m in PRELOAD if m == "torch" or m in sys.modules]
    imported = [m for m in PRELOAD_IF_IMPORTED if m in sys.modules and m not in preload]
    modules = [*preload, *imported]
    if _cuda_gpus_here():
        modules = [m for m in modules if m.partition(".")[0] in CUDA_SAFE_PRELOAD]
    return [SERVER_SETUP, *modules]


def _cuda_gpus_here() -> bool:
    """Whether this host has CUDA GPUs, asked without initialising CUDA here (NVML where
    torch can, as ``torch.cuda.device_count`` does)."""
    import torch

    return torch.cuda.device_count() > 0


def worker_context(preload: Sequence[str] | None = None) -> BaseContext:
    """The multiprocessing context workers start with; a server yet to start preloads
    :func:`server_preload` of ``preload``."""
    ctx = mp.get_context(start_method())
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(server_preload(preload))
    return ctx


def start_server_early(preload: Sequence[str] = PRELOAD) -> None:
    """Start the fork server now, preloading ``preload`` (all of :data:`PRELOAD` unless
    told), so that its imports overlap the caller's own set-up (the console commands call
    this once their config is composed); the Executor then finds it running. Nothing under
    torchrun or SLURM, where every process is a worker already."""
    if "LOCAL_RANK" in os.environ or "SLURM_NTASKS" in os.environ:
        return
    if worker_context(preload).get_start_method() == "forkserver":
        forkserver.ensure_running()


_MAIN_LOCK = threading.Lock()


@contextlib.contextmanager
def main_script_runnable() -> Iterator[None]:
    """While a worker starts: hide the main module's file name when there is no such file
    (``"<stdin>"`` under ``python -``), which the worker would otherwise try to run again
    and die of, before it has an output to say so."""
    with _MAIN_LOCK:
        main = sys.modules.get("__main__")
        path = getattr(main, "__file__", None)
        if path is None or getattr(main, "__spec__", None) is not None or os.path.exists(path):
            yield
            return
        del main.__file__
        try:
            yield
        finally:
            main.__file__ = path


def _open_fd(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@dataclass
class CallerState:
    """The caller's environment, stdout and stderr when a worker starts; a start argument
    of the worker process, applied first thing by :meth:`apply`."""

    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    stdout_fd: int | None = field(default_factory=lambda: 1 if _open_fd(1) else None)
    stderr_fd: int | None = field(default_factory=lambda: 2 if _open_fd(2) else None)
    forked: bool = True
    #: The caller's default start method (``None``: the platform's), which the worker's
    #: own children (data loader workers) then use.
    children_start: str | None = field(default_factory=lambda: mp.get_start_method(allow_none=True))

    def __reduce__(self):
        from multiprocessing.reduction import DupFd  # pickled only while starting

        fds = [None if fd is None else DupFd(fd) for fd in (self.stdout_fd, self.stderr_fd)]
        return (_rebuild, (self.environ, *fds, self.forked, self.children_start))

    def apply(self, env: dict[str, str]) -> None:
        """In the worker: the caller's output, environment (updated with ``env``) and
        default start method, ``SIGTERM``'s default action, and the thread count of
        ``OMP_NUM_THREADS`` (which OpenMP reads only when it loads)."""
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, target in ((self.stdout_fd, 1), (self.stderr_fd, 2)):
            if fd is not None and fd != target:
                os.dup2(fd, target)
                os.close(fd)
        os.environ.clear()
        os.environ.update(self.environ)
        os.environ.update(env)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the server ignores it
        mp.set_start_method(self.children_start, force=True)
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0 and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(threads))

    def finish(self) -> None:
        """In the worker, as it leaves: a forked process ends with ``os._exit``, so run the
        exit handlers an interpreter runs at its end (W&B's, user code's)."""
        if self.forked:
            with contextlib.suppress(Exception):
                atexit._run_exitfuncs()


def _rebuild(
    environ: dict[str, str], stdout, stderr, forked: bool, children_start: str | None
) -> CallerState:
    return CallerState(
        environ,
        None if stdout is None else stdout.detach(),
        None if stderr is None else stderr.detach(),
        forked,
        children_start,
    )
