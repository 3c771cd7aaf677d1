"""RunSupervisor: what a Trainer run tells the Executor it is doing, and how it stops on
``SIGTERM`` or Ctrl-C: every rank agrees on the step, saves a checkpoint there and raises
:class:`TrainingInterrupted`."""

from __future__ import annotations

import signal
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from vidpar.executor import liveness


class TrainingInterrupted(RuntimeError):
    """A fit stopped on a signal (``signum``) after global step ``step``, with its state
    saved to ``checkpoint`` (``None`` when the Trainer has no ``ModelCheckpoint``)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        saved = (
            f"checkpoint saved to {checkpoint} (resume from it with ckpt_path)"
            if checkpoint
            else "no checkpoint saved (the Trainer has no ModelCheckpoint)"
        )
        super().__init__(
            f"training interrupted by {signal_name(signum)} at global step {step}; {saved}"
        )

    def __reduce__(self):
        return (type(self), (self.signum, self.step, self.checkpoint))


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class RunSupervisor(pl.Callback):
    """Added by :class:`~vidpar.lightning.VidParStrategy` to every run.

    Publishes the current activity (training step, validation batch, checkpoint save)
    through :func:`vidpar.executor.liveness.set_activity`, so a stuck worker is reported
    with it. With ``checkpoint_on_interrupt``, a stop request (``SIGTERM`` in any process,
    or the first Ctrl-C in the launching process) makes every rank, at the end of the same
    training step (agreed by an all-reduce over the world's CPU group), save
    ``<ModelCheckpoint dir>/last.ckpt`` and raise :class:`TrainingInterrupted`.
    """

    def __init__(self, checkpoint_on_interrupt: bool = True) -> None:
        self.checkpoint_on_interrupt = checkpoint_on_interrupt

    # Activity ----------------------------------------------------------------------

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        liveness.set_activity(
            f"training: global step {trainer.global_step}, epoch {trainer.current_epoch}, "
            f"batch {batch_idx}"
        )

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        stage = "sanity check" if trainer.sanity_checking else "validation"
        liveness.set_activity(f"{stage}: batch {batch_idx} at global step {trainer.global_step}")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        liveness.set_activity(f"test: batch {batch_idx}")

    def on_predict_batch_start(
        self, trainer, pl_module, batch, batch_idx, dataloader_idx=0
    ) -> None:
        liveness.set_activity(f"predict: batch {batch_idx}")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict) -> None:
        liveness.set_activity(f"saving a checkpoint at global step {trainer.global_step}")

    # Interrupts --------------------------------------------------------------------

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._take_sigterm()

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._take_sigterm()

    def _take_sigterm(self) -> None:
        """Lightning's own SIGTERM handler (set just before) runs a collective inside the
        handler; replace it by a plain stop request."""
        if self.checkpoint_on_interrupt:
            liveness.catch_sigterm()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.checkpoint_on_interrupt or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        signum = _agree(trainer, liveness.stop_requested())
        if not signum or 0 <= trainer.max_steps <= trainer.global_step:
            return  # nothing asked, or the fit ends (and saves as configured) anyway
        path = last_checkpoint_path(trainer)
        if path is not None:
            trainer.save_checkpoint(path)  # collective, ends with a barrier
        raise TrainingInterrupted(signum, trainer.global_step, path)


def _agree(trainer: pl.Trainer, signum: int) -> int:
    """The largest stop request of any rank (every rank gets the same answer)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return signum
    group = trainer.strategy.parallel_state.group("world").cpu_group
    flag = torch.tensor([signum], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())


def last_checkpoint_path(trainer: pl.Trainer) -> str | None:
    """Where the run's ``last`` checkpoint goes (``None`` without a ModelCheckpoint dir)."""
    callback = trainer.checkpoint_callback
    if callback is None or getattr(callback, "dirpath", None) is None:
        return None
    metrics = {"epoch": trainer.current_epoch, "step": trainer.global_step}
    return callback.format_checkpoint_name(metrics, filename=callback.CHECKPOINT_NAME_LAST)
