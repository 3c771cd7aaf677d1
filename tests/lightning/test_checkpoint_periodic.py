"""Work is not lost: vidpar-train saves ``last.ckpt`` every ``checkpoint.every_n_minutes`` by
default, so a run that crashes keeps its last interval's checkpoint, which resumes."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_models import TINY_DIT
from resume_models import CrashAtStep
from vidpar.cli.hydra_setup import register
from vidpar.data import MovingShapesDataModule
from vidpar.distributed import checkpoint_store as store
from vidpar.distributed.checkpoint_state import load_trainer_state
from vidpar.lightning import VideoDiffusionModule, VidParModelCheckpoint, VidParStrategy
from vidpar.lightning.nonfinite import NonFiniteGuard
from vidpar.resources import CONFIG_DIR

STEPS, CRASH_AT = 5, 3


def fit(
    out: Path, callbacks: list, ckpt_path: Path | None = None, every_n_minutes: float | None = 1e-6
) -> pl.Trainer:
    """Train ``STEPS`` steps; ``last.ckpt`` saved every ``every_n_minutes`` (default: every
    step, each ends after the interval)."""
    saver = VidParModelCheckpoint(
        dirpath=out / "checkpoints",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=0,
        every_n_minutes=every_n_minutes,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=VidParStrategy(),
        max_steps=STEPS,
        logger=False,
        callbacks=[saver, *callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=out,
    )
    data = MovingShapesDataModule(
        num_train=24, num_val=2, batch_size=2, num_frames=2, height=8, width=8
    )
    module = VideoDiffusionModule(dit=TINY_DIT, lr=1e-2, num_sample_videos=0)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def test_a_crash_keeps_the_last_interval_checkpoint_and_it_resumes(tmp_path):
    with pytest.raises(Exception, match=f"a bad sample at global step {CRASH_AT}"):
        fit(tmp_path, [CrashAtStep(CRASH_AT)])
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert load_trainer_state(store.resolve(last) / store.TRAINER_STATE)["global_step"] == CRASH_AT
    trainer = fit(tmp_path / "resumed", [], ckpt_path=last)
    assert trainer.global_step == STEPS


class NaNLossAtStep(pl.Callback):
    """Poisons one parameter just before training step ``step``'s forward, so its loss is
    NaN; the weights are restored after the backward, before the guard (a later
    callback) decides."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.param = next(pl_module.parameters())
            self.saved = self.param.detach().clone()
            with torch.no_grad():
                self.param.fill_(float("nan"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                self.param.copy_(self.saved)


def test_a_non_finite_step_saves_the_state_before_it_and_stops(tmp_path):
    """on_nonfinite="raise" (the default) saves the finite state before the bad step as
    last.ckpt, then stops; the checkpoint resumes."""
    out = tmp_path / "nan"
    with pytest.raises(Exception, match=r"NonFiniteError: .*saved .*last\.ckpt"):
        fit(out, [NaNLossAtStep(CRASH_AT), NonFiniteGuard()], every_n_minutes=None)
    last = out / "checkpoints" / "last.ckpt"
    assert load_trainer_state(store.resolve(last) / store.TRAINER_STATE)["global_step"] == CRASH_AT
    assert fit(tmp_path / "resumed", [], ckpt_path=last).global_step == STEPS


def test_vidpar_train_saves_every_30_minutes_by_default():
    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        conf = compose("train", overrides=["output_dir=/tmp/vidpar-compose"])
    saver = instantiate(conf.checkpoint)
    assert isinstance(saver, VidParModelCheckpoint) and saver.every_n_minutes == 30
    assert saver.save_last and saver._every_n_train_steps == conf.trainer.max_steps
    with pytest.raises(ValueError, match="every_n_minutes must be a positive number"):
        VidParModelCheckpoint(every_n_minutes=0)
