"""vidpar: composable tensor, sequence, CFG and data parallelism for video DiTs.

Importing vidpar registers its Lightning strategies (``Trainer(strategy="vidpar")``) in
top-level processes; processes spawned by vidpar itself skip that (importing Lightning
costs seconds) and import :mod:`vidpar.lightning` when they need it.
"""

import multiprocessing

from vidpar.config import ParallelConfig

__all__ = ["ParallelConfig"]
__version__ = "0.1.0"

if multiprocessing.parent_process() is None:
    import vidpar.lightning.strategy  # noqa: F401  (registers the strategies on import)
