"""Imported by the workers' fork server alone (first in its preload list), never by the
caller: the server ignores ``SIGTERM`` and lets go of the caller's stdout and stderr.

SLURM (and the tests) send ``SIGTERM`` to every process of a job, the server included;
ignoring it, the server lives exactly as long as its caller (it exits when the caller
closes its end), and ``SIGINT`` it ignores already. (A server that dies all the same fails
no running worker: the caller watches each one through a pidfd, not through the server.)
Workers restore the default and take the caller's output as they start
(:meth:`~vidpar.executor.start_method.CallerState.apply`), so the server needs none: holding
it would keep a caller's pipes open after the caller exits, until the server's imports end.
"""

import os
import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
_devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(_devnull, 1)
os.dup2(_devnull, 2)
os.close(_devnull)
