"""Callbacks and loaders for the exact-resume tests (importable by spawned workers)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_models import TINY_DIT
from vidpar.data import MovingShapesDataset
from vidpar.lightning import VideoDiffusionModule


class StepLog(pl.Callback):
    """Writes, per rank, every training step's ``[global_step, loss, sample indices]`` to
    ``<out_dir>/rank<r>.json`` (appending to what an earlier run of the same dir wrote)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.steps: list[list] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = float(outputs["loss"].detach())
        self.steps.append([trainer.global_step, loss, batch["index"].tolist()])

    def on_train_end(self, trainer, pl_module) -> None:
        path = Path(self.out_dir) / f"rank{trainer.global_rank}.json"
        previous = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(previous + self.steps))


def read_steps(out_dir: str | Path, rank: int) -> list[list]:
    return json.loads((Path(out_dir) / f"rank{rank}.json").read_text())


class SkippingLoader(DataLoader):
    """A user's own stateful loader: it counts the batches of its epoch and, after
    ``load_state_dict``, skips that many at the start of its next iteration."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.taken = 0
        self.skip = 0

    def __iter__(self):
        self.taken, skip, self.skip = self.skip, self.skip, 0
        for i, batch in enumerate(super().__iter__()):
            if i < skip:
                continue
            self.taken += 1
            yield batch

    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.skip = state["taken"]


class UserLoaderDiT(VideoDiffusionModule):
    """The tiny DiT on shuffled clips from a :class:`SkippingLoader` (Lightning shards it
    with its own DistributedSampler)."""

    def __init__(self) -> None:
        super().__init__(dit=TINY_DIT, lr=1e-2, num_sample_videos=0)

    def train_dataloader(self) -> SkippingLoader:
        data = MovingShapesDataset(32, num_frames=2, height=8, width=8)
        return SkippingLoader(data, batch_size=2, shuffle=True)


class CrashAtStep(pl.Callback):
    """Raises (as a bad sample would) when training step ``step`` is about to start."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"a bad sample at global step {self.step}")
