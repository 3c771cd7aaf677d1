"""VideoDiffusionModule: flow-matching training of vidpar's VideoDiT under any layout."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, get_args

import lightning.pytorch as pl
import torch

from vidpar.lightning.nonfinite import NonFiniteGuard, OnNonFinite, check_on_nonfinite
from vidpar.nn.dit import DiTConfig, VideoDiT
from vidpar.pipelines.flow_matching import (
    FlowMatchEulerSampler,
    TimestepSampling,
    flow_matching_loss,
)
from vidpar.pipelines.video_io import to_uint8_frames, write_video


def check_timestep_sampling(value: str) -> None:
    """A ``ValueError`` naming the choices unless ``value`` is a known timestep sampling."""
    if value not in get_args(TimestepSampling):
        choices = " or ".join(repr(c) for c in get_args(TimestepSampling))
        raise ValueError(f"timestep_sampling must be {choices}, got {value!r}")


def sample_noise_and_time(
    indices: torch.Tensor,
    step: int,
    shape: tuple[int, ...],
    seed: int = 0,
    timestep_sampling: str = "uniform",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and flow time for each sample, a pure function of (seed, step, sample index).

    Every rank of one tp/sp group, and a single-process run of the same global batch,
    draw exactly the same values, whatever the layout. ``timestep_sampling`` is
    ``"uniform"`` or ``"logit_normal"`` (which favours mid-range times).
    """
    noises, times = [], []
    for index in indices.tolist():
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 65_537 + int(index))
        noises.append(torch.randn(shape, generator=gen))
        if timestep_sampling == "logit_normal":
            times.append(torch.sigmoid(torch.randn((), generator=gen)))
        else:
            times.append(torch.rand((), generator=gen))
    return torch.stack(noises), torch.stack(times)


def sample_cfg_dropout(
    indices: torch.Tensor, step: int, probability: float, seed: int = 0
) -> torch.Tensor:
    """Which samples train unconditionally (``[B]`` bool), a pure function of (seed, step,
    sample index) like :func:`sample_noise_and_time`."""
    return sample_noise_and_time(indices, step + 1_000_000, (1,), seed)[1] < probability


class VideoDiffusionModule(pl.LightningModule):
    """Trains :class:`~vidpar.nn.dit.VideoDiT` with the rectified-flow objective.

    The network is built in :meth:`configure_model`, after the strategy created the parallel
    groups, so its layers shard themselves for the layout. Labels are dropped to the null
    class with probability ``cfg_dropout`` so classifier-free guidance works at sampling.
    Validation draws sample videos on every rank (sp/tp/cfg-parallel) and logs them.

    ``ema_decay > 0`` keeps an exponential moving average of the weights in ``ema_model``
    (sharded like ``model``, saved in checkpoints); validation samples and exported weights
    then come from it. The decay warms up as ``min(ema_decay, (1 + n) / (10 + n))`` after
    ``n`` optimizer steps, so early averages do not drag the random initialisation along.

    ``on_nonfinite`` (``"raise"``, ``"skip_step"`` or ``"warn"``) is what a NaN or
    infinite loss or gradient does (:class:`~vidpar.lightning.NonFiniteGuard`).
    """

    def __init__(
        self,
        dit: DiTConfig | dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        cfg_dropout: float = 0.1,
        seed: int = 0,
        sample_steps: int = 10,
        guidance_scale: float = 3.0,
        num_sample_videos: int = 2,
        video_dir: str | None = None,
        class_names: list[str] | None = None,
        video_shape: list[int] | None = None,
        timestep_sampling: str = "uniform",
        ema_decay: float = 0.0,
        on_nonfinite: OnNonFinite = "raise",
    ) -> None:
        super().__init__()
        check_on_nonfinite(on_nonfinite)
        check_timestep_sampling(timestep_sampling)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 turns EMA off), got {ema_decay}")
        dit = dit if isinstance(dit, DiTConfig) else DiTConfig(**(dit or {}))
        if video_shape is not None and video_shape[0] != dit.in_channels:
            raise ValueError(
                f"video_shape {tuple(video_shape)} has {video_shape[0]} channels, but the DiT "
                f"takes in_channels={dit.in_channels}"
            )
        self.save_hyperparameters({**locals_without_self(locals()), "dit": asdict(dit)})
        self.dit_config = dit
        self.model: VideoDiT | None = None
        self.ema_model: VideoDiT | None = None

    def configure_model(self) -> None:
        if self.model is None:
            torch.manual_seed(self.hparams.seed)
            self.model = VideoDiT(self.dit_config)
        if self.hparams.ema_decay > 0 and self.ema_model is None:
            torch.manual_seed(self.hparams.seed)  # the same init and shards as self.model
            self.ema_model = VideoDiT(self.dit_config).requires_grad_(False)

    @property
    def sampling_model(self) -> VideoDiT:
        """The network that draws samples: the EMA copy when there is one."""
        return self.ema_model if self.ema_model is not None else self.model

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, cond)

    def _loss(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        x0, labels, indices = batch["video"], batch["label"], batch["index"]
        noise, t = sample_noise_and_time(
            indices.cpu(),
            step,
            tuple(x0.shape[1:]),
            self.hparams.seed,
            self.hparams.timestep_sampling,
        )
        noise, t = noise.to(x0), t.to(x0)
        drop = sample_cfg_dropout(indices.cpu(), step, self.hparams.cfg_dropout, self.hparams.seed)
        cond = torch.where(
            drop.to(labels.device),
            torch.full_like(labels, self.dit_config.num_classes),
            labels,
        )
        return flow_matching_loss(self.model, x0, cond, t=t, noise=noise)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch, self.global_step)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema_model is not None:
            self._update_ema()

    @torch.no_grad()
    def _update_ema(self) -> None:
        """``ema ← ema + (1 - decay) · (weights - ema)``, shard by shard on every rank."""
        n = self.global_step  # optimizer steps taken before this one
        decay = min(self.hparams.ema_decay, (1 + n) / (10 + n))
        for ema, weight in zip(self.ema_model.parameters(), self.model.parameters(), strict=True):
            ema.lerp_(weight.detach(), 1.0 - decay)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch, step=-1 - batch_idx)  # fixed noise: comparable across epochs
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        if batch_idx == 0 and not self.trainer.sanity_checking and self.hparams.num_sample_videos:
            self._log_samples(
                self.sample(list(range(self.hparams.num_sample_videos)), batch["video"].shape[1:])
            )

    @torch.no_grad()
    def sample(
        self, labels: list[int], video_shape: tuple[int, ...], seed: int = 0
    ) -> torch.Tensor:
        """Videos ``[N, C, T, H, W]`` in [-1, 1]; every rank of the layout takes part."""
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(labels), *video_shape), generator=gen).to(self.device)
        cond = torch.tensor(labels, device=self.device)
        null = torch.full_like(cond, self.dit_config.num_classes)
        sampler = FlowMatchEulerSampler(num_steps=self.hparams.sample_steps)
        model = self.sampling_model
        was_training = model.training
        model.eval()
        try:
            return sampler.sample(
                model, noise, cond, null, self.hparams.guidance_scale, show_progress=False
            )
        finally:
            model.train(was_training)

    def _log_samples(self, videos: torch.Tensor) -> None:
        """Rank 0 writes the samples as GIFs and logs them (as videos with W&B)."""
        if not self.trainer.is_global_zero:
            return
        out_dir = Path(self.hparams.video_dir or self.trainer.default_root_dir) / "samples"
        paths = []
        for i, video in enumerate(videos):
            path = out_dir / f"step{self.global_step:06d}_class{i}.gif"
            write_video(path, to_uint8_frames(video.float().cpu()), fps=4)
            paths.append(str(path))
        for logger in self.trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_video("val/samples", paths, step=self.global_step)

    def configure_callbacks(self) -> list[pl.Callback]:
        return [NonFiniteGuard(self.hparams.on_nonfinite)]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )


def locals_without_self(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in ("self", "__class__", "dit")}
