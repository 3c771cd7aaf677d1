"""StepProgressBar: a step-limited fit's progress in optimizer steps, not epochs."""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counted in steps of ``trainer.max_steps`` when the fit is
    step-limited: ``Training 40/1200 [00:19<09:31, 2.03it/s, train/loss=0.912]`` across
    epochs (a fit by ``max_epochs`` keeps Lightning's per-epoch bar); every
    ``trainer.log_every_n_steps`` steps a line ``step 40/1200: train/loss 0.9120`` stays."""

    def __init__(self, loss_key: str = "train/loss", refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.loss_key = loss_key
        self._step = 0

    @staticmethod
    def _max_steps(trainer: pl.Trainer) -> int | None:
        return trainer.max_steps if trainer.max_steps > 0 else None

    def init_validation_tqdm(self) -> Tqdm:
        """Lightning's validation bar, but on the training bar's line (which redraws after
        it), so no cursor movement reaches a log file."""
        return Tqdm(
            desc=self.validation_description,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=self.trainer.state.fn == "validate",
            dynamic_ncols=True,
            file=sys.stdout,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        if (total := self._max_steps(trainer)) is not None:
            bar = self.train_progress_bar
            bar.reset(total=total)
            # A resumed fit starts where it was, and its rate counts this run's steps.
            bar.initial = bar.n = self._step = trainer.global_step
            bar.set_description("Training")

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._max_steps(trainer) is None:
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        total = self._max_steps(trainer)
        if total is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if step == self._step or not self.is_enabled:  # gradient accumulation: no step yet
            return
        self._step = step
        if total is not None and self._should_update(step, total):
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
        loss = trainer.callback_metrics.get(self.loss_key)
        if loss is not None and step % max(trainer.log_every_n_steps, 1) == 0:
            of_total = "" if total is None else f"/{total}"
            self.print(f"step {step}{of_total}: {self.loss_key} {float(loss):.4f}")

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's run id: not progress
        return metrics
