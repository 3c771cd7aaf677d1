"""Non-finite losses and gradients: NaN in one rank's data stops the run naming the step and
the rank (every rank agreeing), skip_step drops the step everywhere and training goes on
finite, warn goes on, and a diverged model never replaces the last good checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from lightning_models import RecordingDiT, read_losses
from vidpar.cli.hydra_setup import register
from vidpar.distributed import checkpoint_store as store
from vidpar.distributed.checkpoint_integrity import verify
from vidpar.lightning import NonFiniteGuard, VidParModelCheckpoint, VidParStrategy
from vidpar.resources import CONFIG_DIR


class NaNData(RecordingDiT):
    """RecordingDiT whose batch turns NaN on rank ``nan_rank`` at step ``nan_step``."""

    def __init__(self, log_dir: str, nan_step: int, nan_rank: int, on_nonfinite: str) -> None:
        super().__init__(log_dir, on_nonfinite=on_nonfinite)
        self.nan_step, self.nan_rank = nan_step, nan_rank

    def training_step(self, batch, batch_idx):
        if self.global_step == self.nan_step and self.global_rank == self.nan_rank:
            batch = {**batch, "video": torch.full_like(batch["video"], math.nan)}
        return super().training_step(batch, batch_idx)


def fit(
    log_dir: Path,
    model: RecordingDiT,
    devices: int,
    max_steps: int,
    accelerator: str = "cpu",
    precision: str = "64-true",
    keep_last: int = 1,
) -> pl.Trainer:
    """A fit with VidParStrategy(dp=devices) (float64 on CPU), saving after every step."""
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=VidParStrategy(dp=devices),
        max_steps=max_steps,
        precision=precision,
        logger=False,
        callbacks=[
            VidParModelCheckpoint(
                dirpath=log_dir / "ckpt",
                save_last=True,
                save_top_k=0,
                every_n_train_steps=1,
                keep_last=keep_last,
            )
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=log_dir,
    )
    trainer.fit(model)
    return trainer


def saved(ckpt: Path, tmp_path: Path) -> dict:
    """Everything in the checkpoint's current version, as one dict (the version verified)."""
    version = store.resolve(ckpt)
    verify(version)
    dcp_to_torch_save(version, tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    return {**full, **torch.load(version / store.TRAINER_STATE, weights_only=False)}


def all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if torch.is_tensor(v))


def test_nan_in_one_ranks_data_stops_the_run_naming_step_and_rank(tmp_path):
    model = NaNData(str(tmp_path), nan_step=2, nan_rank=1, on_nonfinite="raise")
    with pytest.raises(
        Exception,
        match=r"Non-finite loss \(NaN or inf\) at training step 2 "
        r"\(epoch 1\) on rank 1\. The run stops here",
    ) as err:
        fit(tmp_path, model, devices=2, max_steps=4)
    assert "rank 0 raised NonFiniteError" in str(err.value)  # rank 0 took the decision too
    checkpoint = saved(tmp_path / "ckpt" / "last.ckpt", tmp_path)
    assert checkpoint["global_step"] == 2 and all_finite(checkpoint["model"])


def test_skip_step_drops_the_step_on_every_rank_and_training_goes_on(tmp_path):
    model = NaNData(str(tmp_path), nan_step=1, nan_rank=1, on_nonfinite="skip_step")
    trainer = fit(tmp_path, model, devices=2, max_steps=4)
    assert trainer.global_step == 4
    losses = read_losses(tmp_path)
    assert math.isnan(losses[1]) and all(math.isfinite(x) for i, x in enumerate(losses) if i != 1)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    checkpoint = saved(tmp_path / "ckpt" / "last.ckpt", tmp_path)
    assert checkpoint["global_step"] == 4 and all_finite(checkpoint["model"])
    # AdamW updated every weight in 3 of the 4 steps: the skipped one left no trace.
    steps = {float(s["step"]) for s in checkpoint["optimizer_0"]["state"].values()}
    assert steps == {3.0}


def test_warn_goes_on_but_the_diverged_model_does_not_replace_the_checkpoint(tmp_path):
    model = NaNData(str(tmp_path), nan_step=1, nan_rank=0, on_nonfinite="warn")
    with pytest.raises(
        Exception,
        match=r"Refusing to save the checkpoint .*last\.ckpt: weights "
        r"are NaN or infinite on rank\(s\) \[0\]",
    ):
        fit(tmp_path, model, devices=1, max_steps=3)
    checkpoint = saved(tmp_path / "ckpt" / "last.ckpt", tmp_path)
    assert checkpoint["global_step"] == 1 and all_finite(checkpoint["model"])
    assert len(store.versions(tmp_path / "ckpt" / "last.ckpt")) == 1


def test_vidpar_train_wires_on_nonfinite_and_keep_last():
    register()  # the layout presets
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        conf = compose(
            "train",
            overrides=[
                "output_dir=/tmp/vidpar-compose",
                "model.on_nonfinite=skip_step",
                "checkpoint.keep_last=3",
            ],
        )
    module = instantiate(conf.model, class_names=["a"] * 4, video_shape=[3, 8, 16, 16])
    (guard,) = module.configure_callbacks()
    assert isinstance(guard, NonFiniteGuard) and guard.on_nonfinite == "skip_step"
    callback = instantiate(conf.checkpoint)
    assert isinstance(callback, VidParModelCheckpoint) and callback.keep_last == 3
    with pytest.raises(ValueError, match="on_nonfinite must be one of raise, skip_step, warn"):
        NonFiniteGuard("ignore")
    with pytest.raises(ValueError, match="keep_last must be a positive integer, got 0"):
        VidParModelCheckpoint(keep_last=0)


@pytest.mark.gpu
def test_on_gpu_the_guard_checks_device_gradients_and_cuda_checkpoints_verify(tmp_path):
    from vidpar.lightning.nonfinite import _any_non_finite

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        grads = [torch.ones(64, device="cuda", dtype=dtype) for _ in range(3)]
        assert _any_non_finite(grads).device.type == "cuda" and not _any_non_finite(grads)
        grads[1][7] = math.inf
        assert bool(_any_non_finite(grads)), dtype
    model = NaNData(str(tmp_path), nan_step=2, nan_rank=0, on_nonfinite="raise")
    with pytest.raises(Exception, match=r"Non-finite loss \(NaN or inf\) at training step 2"):
        fit(tmp_path, model, 1, 4, accelerator="gpu", precision="bf16-mixed", keep_last=2)
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    versions = store.versions(ckpt)
    assert [torch.load(v / store.TRAINER_STATE)["global_step"] for v in versions] == [1, 2]
    for version in versions:
        verify(version)
    checkpoint = saved(ckpt, tmp_path)
    assert checkpoint["global_step"] == 2 and all_finite(checkpoint["model"])
