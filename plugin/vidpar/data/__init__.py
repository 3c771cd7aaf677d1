"""Synthetic video datasets, and folders of precomputed latents (:mod:`vidpar.data.latents`).

``MovingShapesDataModule`` and ``LatentsDataModule`` (Lightning) are imported lazily from
:mod:`vidpar.data.datamodule`, so ``import vidpar.data`` stays free of Lightning.
"""

from __future__ import annotations

from typing import Any

from vidpar.data.latents import LatentsDataset, write_latents_folder
from vidpar.data.moving_shapes import COLOURS, SHAPES, MovingShapesDataset, ShapeFit, fit_shape

__all__ = [
    "COLOURS",
    "SHAPES",
    "LatentsDataModule",
    "LatentsDataset",
    "MovingShapesDataModule",
    "MovingShapesDataset",
    "ShapeFit",
    "fit_shape",
    "write_latents_folder",
]


def __getattr__(name: str) -> Any:
    if name in ("MovingShapesDataModule", "LatentsDataModule"):
        from vidpar.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
