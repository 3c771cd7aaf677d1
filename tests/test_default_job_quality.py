"""The default job's recipe learns what the README promises: its samples show the class's
shape, moving. Trains the composed default model and data in one process for the default
number of steps (noise and flow times are drawn per sample, so this is the training of the
tp2 × sp2 job, in another summation order) and scores the samples with ``fit_shape``."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from vidpar.cli.hydra_setup import register
from vidpar.data import fit_shape
from vidpar.resources import CONFIG_DIR

register()


@pytest.mark.slow
def test_the_default_recipe_draws_moving_shapes(tmp_path) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"output_dir={tmp_path}"])
    assert (cfg.parallel.tp, cfg.parallel.sp) == (2, 2)  # the job this stands for
    pl.seed_everything(cfg.seed, verbose=False)
    data = instantiate(cfg.data)
    module = instantiate(cfg.model, num_sample_videos=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=cfg.trainer.max_steps,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)

    labels = [label for label in range(data.num_classes) for _ in range(4)]
    videos = module.sample(labels, data.video_shape, seed=1)
    fits = [fit_shape(video, label) for video, label in zip(videos, labels, strict=True)]
    iou = torch.stack([f.iou.mean() for f in fits])
    speed = torch.stack([f.centre.diff(dim=0).norm(dim=1).mean() for f in fits])
    # Dataset clips score IoU 0.93 at 1.15 px/frame; this recipe about 0.65 at 1.5, and the
    # recipe before tuning (hidden 64, patch 1×2×2, RoPE base 1e4, 300 steps) drew speckles
    # that scored 0.38 and jumped 2.5 px/frame.
    assert iou.mean() > 0.55, iou
    assert iou.view(data.num_classes, 4).mean(1).min() > 0.4, iou
    assert 0.4 < speed.mean() < 2.2, speed
