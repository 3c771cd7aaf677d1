"""Small LightningModules for the strategy tests (importable by spawned workers)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from vidpar.data import MovingShapesDataset
from vidpar.lightning import VideoDiffusionModule
from vidpar.nn.dit import DiTConfig
from vidpar.nn.regional_compile import CompileSetting

TINY_DIT = DiTConfig(
    in_channels=3, patch_size=(1, 2, 2), hidden_size=32, num_heads=4, depth=1, num_classes=4
)
GLOBAL_BATCH = 4


class RecordingDiT(VideoDiffusionModule):
    """The tiny DiT (with an EMA copy) on a fixed, unshuffled dataset; writes its per-step
    global loss.

    Each dp rank gets ``GLOBAL_BATCH / dp`` samples, so every step sees the same global
    batch whatever the layout.
    """

    def __init__(self, log_dir: str, compile: CompileSetting = False, **kwargs) -> None:
        kwargs.setdefault("ema_decay", 0.9)  # every layout test checks the EMA copy too
        dit = dataclasses.replace(TINY_DIT, compile=compile)
        super().__init__(dit=dit, lr=1e-2, num_sample_videos=0, **kwargs)
        self.log_dir = log_dir
        self.losses: list[float] = []

    def train_dataloader(self) -> DataLoader:
        """Unshuffled, sharded with the strategy's own dp sampler arguments (the Trainer
        runs with ``use_distributed_sampler=False``: Lightning's would shuffle)."""
        # Two steps per epoch, so a checkpoint at step 2 sits on an epoch boundary (Lightning
        # restarts a plain DataLoader's epoch when resuming mid-epoch).
        dataset = MovingShapesDataset(
            2 * GLOBAL_BATCH, num_frames=2, height=8, width=8, num_classes=4
        )
        if self.trainer.world_size == 1:
            return DataLoader(dataset, batch_size=GLOBAL_BATCH)
        shard = self.trainer.strategy.distributed_sampler_kwargs
        sampler = DistributedSampler(dataset, shuffle=False, **shard)
        return DataLoader(
            dataset, batch_size=GLOBAL_BATCH // shard["num_replicas"], sampler=sampler
        )

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch, self.global_step)
        # A copy: the strategy's reduce all-reduces in place.
        mean = self.trainer.strategy.reduce(loss.detach().clone(), reduce_op="mean")
        self.losses.append(float(mean))
        return loss

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            path = Path(self.log_dir) / "losses.json"
            previous = json.loads(path.read_text()) if path.exists() else []
            path.write_text(json.dumps(previous + self.losses))


def read_losses(log_dir: str | Path) -> list[float]:
    return json.loads((Path(log_dir) / "losses.json").read_text())


def full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class PlainTransformer(pl.LightningModule):
    """A LightningModule of torch layers only (no vidpar layer): what a user brings."""

    def __init__(self) -> None:
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16)
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)

    def training_step(self, batch, batch_idx):
        return self.encoder(batch).pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(8, 4, 8, generator=torch.Generator().manual_seed(0)), 2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)
