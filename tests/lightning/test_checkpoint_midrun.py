"""Mid-run checkpoints with Lightning's Trainer: saving at every step (tp2, tp2 × sp2, FSDP2
over sp2 × dp2) leaves training exactly as without saves, and keep_last versions of the
checkpoint stay on disk, the newest under its name."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_models import RecordingDiT, full_weights, read_losses
from vidpar.distributed import checkpoint_store as store
from vidpar.distributed.checkpoint_integrity import verify
from vidpar.lightning import VidParModelCheckpoint, VidParStrategy

STEPS = 4


def fit(log_dir: Path, strategy, devices: int, keep_last: int | None = None):
    """``STEPS`` steps of RecordingDiT (float64); with ``keep_last``, a save after every step."""
    log_dir.mkdir(parents=True, exist_ok=True)
    model = RecordingDiT(str(log_dir))
    callbacks = []
    if keep_last is not None:
        callbacks.append(
            VidParModelCheckpoint(
                dirpath=log_dir / "ckpt",
                save_last=True,
                save_top_k=0,
                every_n_train_steps=1,
                keep_last=keep_last,
            )
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=STEPS,
        precision="64-true",
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=keep_last is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=log_dir,
    )
    trainer.fit(model)
    return model, trainer


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``STEPS`` steps in this process, no parallelism, no saves."""
    log_dir = tmp_path_factory.mktemp("reference")
    model, _ = fit(log_dir, "auto", devices=1)
    return read_losses(log_dir), full_weights(model)


@pytest.mark.parametrize(
    ("strategy", "devices", "keep_last"),
    [
        (VidParStrategy(tp=2), 2, 2),
        (VidParStrategy(tp=2, sp=2), 4, 1),
        (VidParStrategy(sp=2, dp=2, data_parallel="fsdp"), 4, 3),
    ],
    ids=["tp2", "tp2xsp2", "fsdp_sp2xdp2"],
)
def test_training_goes_on_unchanged_after_every_mid_run_save(
    reference, tmp_path, strategy, devices, keep_last
):
    ref_losses, ref_weights = reference
    model, trainer = fit(tmp_path, strategy, devices, keep_last=keep_last)
    assert trainer.global_step == STEPS
    assert read_losses(tmp_path) == pytest.approx(ref_losses, rel=1e-9)
    got = full_weights(model)
    for name, expect in ref_weights.items():
        err = (got[name] - expect).abs().max().item()
        assert err <= 1e-6 * (1 + expect.abs().max().item()), (name, err)
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    versions = store.versions(ckpt)
    assert len(versions) == keep_last and store.resolve(ckpt) == versions[-1]
    steps = [torch.load(v / store.TRAINER_STATE)["global_step"] for v in versions]
    assert steps == list(range(STEPS - keep_last + 1, STEPS + 1))
    for version in versions:
        verify(version)
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if ".partial-" in p.name] == []
