"""Imported by the workers' fork server alone (first in its preload list), never by the
caller: the server ignores ``SIGTERM``.

The caller learns that a worker ended from the server, so a server that died would read
as every worker dying. SLURM (and the tests) send ``SIGTERM`` to every process of a job,
the server included; ignoring it, the server lives exactly as long as its caller (it
exits when the caller closes its end), and ``SIGINT`` it ignores already. Workers restore
the default (:meth:`~vidpar.executor.start_method.CallerState.apply`).
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
