"""Synthetic video datasets.

``MovingShapesDataModule`` (Lightning) is imported lazily from
:mod:`vidpar.data.datamodule`, so ``import vidpar.data`` stays free of Lightning.
"""

from __future__ import annotations

from typing import Any

from vidpar.data.moving_shapes import COLOURS, SHAPES, MovingShapesDataset, ShapeFit, fit_shape
from vidpar.data.sampler import DataParallelSampler, ResumableDataLoader

__all__ = [
    "COLOURS",
    "SHAPES",
    "DataParallelSampler",
    "MovingShapesDataModule",
    "MovingShapesDataset",
    "ResumableDataLoader",
    "ShapeFit",
    "fit_shape",
]


def __getattr__(name: str) -> Any:
    if name == "MovingShapesDataModule":
        from vidpar.data.datamodule import MovingShapesDataModule

        return MovingShapesDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
