"""VidParModelCheckpoint: Lightning's ModelCheckpoint, plus how many versions to keep and a
save of ``last`` every N minutes of training."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from vidpar.distributed.checkpoint_store import sweep_partials


class VidParModelCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` for
    :class:`~vidpar.lightning.VidParStrategy`, whose every save writes a new version of the
    checkpoint and switches its name to it atomically: ``keep_last`` versions of each
    checkpoint stay on disk (the current one included; older ones are hidden directories
    ``.<name>.v<seq>`` beside it).

    ``every_n_minutes`` (``None``: off) also saves the ``last`` checkpoint (with
    ``save_last``) at the end of the first optimizer step that ends that long after the
    previous save (or the start of training), beside ``every_n_train_steps``' saves: a run
    that crashes loses at most that much work. Rank 0's clock decides, for every rank.
    At setup, what saves killed midway left in ``dirpath`` (``.partial-`` directories) is
    removed. Every other argument is ModelCheckpoint's.

    Its ``state_key`` leaves out the save interval, which vidpar derives from
    ``trainer.max_steps``: a run resumed with more steps finds its state (Lightning would
    otherwise warn that the callback that made the checkpoint is missing)."""

    def __init__(
        self, *args: Any, keep_last: int = 1, every_n_minutes: float | None = None, **kwargs: Any
    ) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be a positive integer, got {keep_last!r}")
        if every_n_minutes is not None and (
            isinstance(every_n_minutes, bool)
            or not isinstance(every_n_minutes, int | float)
            or not every_n_minutes > 0
        ):
            raise ValueError(
                f"every_n_minutes must be a positive number of minutes or None, got "
                f"{every_n_minutes!r}"
            )
        super().__init__(*args, **kwargs)
        self.keep_last = keep_last
        self.every_n_minutes = every_n_minutes
        self._last_save_time = time.monotonic()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath is not None and Path(self.dirpath).is_dir():
            sweep_partials(Path(self.dirpath))
        if hasattr(trainer.strategy, "checkpoint_keep_last"):
            trainer.strategy.checkpoint_keep_last = self.keep_last
        elif self.keep_last != 1:
            raise TypeError(
                f"VidParModelCheckpoint(keep_last={self.keep_last}) needs VidParStrategy, whose "
                f"saves are versioned; this Trainer runs {type(trainer.strategy).__name__}. Use "
                "strategy=VidParStrategy(...), or leave keep_last at 1."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_save_time = time.monotonic()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if (
            self.every_n_minutes is None
            or not self.save_last
            or (batch_idx + 1) % trainer.accumulate_grad_batches  # mid-step: not a state
            or self._should_skip_saving_checkpoint(trainer)  # saved at this step already
        ):
            return
        due = time.monotonic() - self._last_save_time >= 60 * self.every_n_minutes
        if trainer.strategy.broadcast(due):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._last_save_time = time.monotonic()
