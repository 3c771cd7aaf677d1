"""VidParModelCheckpoint: Lightning's ModelCheckpoint, plus how many versions to keep."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class VidParModelCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` for
    :class:`~vidpar.lightning.VidParStrategy`, whose every save writes a new version of the
    checkpoint and switches its name to it atomically: ``keep_last`` versions of each
    checkpoint stay on disk (the current one included; older ones are hidden directories
    ``.<name>.v<seq>`` beside it). Every other argument is ModelCheckpoint's.

    Its ``state_key`` leaves out the save interval, which vidpar derives from
    ``trainer.max_steps``: a run resumed with more steps finds its state (Lightning would
    otherwise warn that the callback that made the checkpoint is missing)."""

    def __init__(self, *args: Any, keep_last: int = 1, **kwargs: Any) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be a positive integer, got {keep_last!r}")
        super().__init__(*args, **kwargs)
        self.keep_last = keep_last

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if hasattr(trainer.strategy, "checkpoint_keep_last"):
            trainer.strategy.checkpoint_keep_last = self.keep_last
        elif self.keep_last != 1:
            raise TypeError(
                f"VidParModelCheckpoint(keep_last={self.keep_last}) needs VidParStrategy, whose "
                f"saves are versioned; this Trainer runs {type(trainer.strategy).__name__}. Use "
                "strategy=VidParStrategy(...), or leave keep_last at 1."
            )
