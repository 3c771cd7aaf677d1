"""vidpar: composable tensor, sequence, CFG and data parallelism for video DiTs.

``import vidpar`` imports only torch; its Lightning strategies (``Trainer(strategy="vidpar")``
and presets) are registered when Lightning is imported, before or after vidpar.
"""

from vidpar import lightning_registration
from vidpar.config import ParallelConfig

__all__ = ["ParallelConfig"]
__version__ = "0.1.0"

lightning_registration.install()
