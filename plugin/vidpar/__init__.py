"""vidpar: composable tensor, sequence, CFG and data parallelism for video DiTs."""

from vidpar.config import ParallelConfig

__all__ = ["ParallelConfig"]
__version__ = "0.1.0"
