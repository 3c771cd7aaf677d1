"""CollectiveTelemetry: every collective of the run, per step, in the Trainer's logger."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from vidpar.distributed import telemetry
from vidpar.distributed.telemetry import CollectiveRecord, format_summary, summarize


class CollectiveTelemetry(pl.Callback):
    """Logs ``comm/<group>/<op>/{calls,bytes,time_ms,busbw_GBps}`` every ``log_every_n_steps``
    training steps (rank 0's view), and at the end of fit prints a summary table and, with
    a W&B logger, logs it as a ``wandb.Table`` with a chart."""

    def __init__(self, log_every_n_steps: int = 1) -> None:
        self.log_every_n_steps = log_every_n_steps
        self._recorder: telemetry.CollectiveRecorder | None = None
        self._owns_recorder = False
        self._window: list[CollectiveRecord] = []
        self._totals: list[CollectiveRecord] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._recorder = telemetry.active_recorder()
        if self._recorder is None:
            self._recorder = telemetry.start_recording()
            self._owns_recorder = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._owns_recorder:
            telemetry.stop_recording()
        self._recorder, self._owns_recorder = None, False

    def _take(self) -> list[CollectiveRecord]:
        return self._recorder.drain() if self._recorder is not None else []

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        records = self._take()
        self._window += records
        self._totals += records
        if trainer.global_step % self.log_every_n_steps or not self._window:
            return
        metrics: dict[str, float] = {}
        for summary in summarize(self._window):
            metrics |= summary.as_metrics("comm")
        self._window = []
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        records = self._take()
        self._totals += records
        if trainer.is_global_zero and records and not trainer.sanity_checking:
            metrics: dict[str, float] = {}
            for summary in summarize(records):
                metrics |= summary.as_metrics("comm_val")
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._totals += self._take()
        summaries = summarize(self._totals)
        if not trainer.is_global_zero or not summaries:
            return
        rank_zero_info("Communication summary (rank 0, whole fit):\n" + format_summary(summaries))
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                _log_wandb_table(logger, summaries)

    @property
    def total_records(self) -> list[CollectiveRecord]:
        """Every record seen during fit (rank-local)."""
        return list(self._totals)


def _log_wandb_table(logger, summaries) -> None:
    import wandb

    columns = ["group", "op", "calls", "MiB", "time_ms", "busbw_GBps"]
    rows = [
        [s.group, s.op, s.calls, s.nbytes / 2**20, s.seconds * 1e3, s.busbw / 1e9]
        for s in summaries
    ]
    table = wandb.Table(columns=columns, data=rows)
    table_with_keys = wandb.Table(
        columns=["collective", "time_ms"], data=[[f"{r[0]}/{r[1]}", r[4]] for r in rows]
    )
    logger.experiment.log(
        {
            "comm/summary": table,
            "comm/time_by_collective": wandb.plot.bar(
                table_with_keys, "collective", "time_ms", title="Time in collectives (ms)"
            ),
        }
    )
