"""A LightningDataModule over :class:`MovingShapesDataset` (the only Lightning import in
``vidpar.data``).

Both splits are sharded over dp only, with vidpar's own :class:`DataParallelSampler`
(a ``DistributedSampler``, so Lightning does not replace it), hence every rank of one
tp/sp group sees the same batch. The training loader is a :class:`ResumableDataLoader`:
its place in the epoch is saved in checkpoints, and a run resumed mid-epoch sees the
batches of an uninterrupted one.
"""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from vidpar.data.moving_shapes import MovingShapesDataset
from vidpar.data.sampler import DataParallelSampler, ResumableDataLoader
from vidpar.distributed.state import get_parallel_state


class MovingShapesDataModule(pl.LightningDataModule):
    """Train and validation splits of MovingShapes, with disjoint seeds.

    ``seed`` makes the training split and its shuffling (a pure function of
    ``(seed, epoch)``); the validation split uses ``seed + 1``. ``batch_size`` is per dp
    replica.
    """

    def __init__(
        self,
        num_train: int = 1024,
        num_val: int = 64,
        batch_size: int = 8,
        num_frames: int = 8,
        height: int = 16,
        width: int = 16,
        num_classes: int = 4,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        clip = {
            "num_frames": num_frames,
            "height": height,
            "width": width,
            "num_classes": num_classes,
        }
        self.train_set = MovingShapesDataset(num_train, seed=seed, **clip)
        self.val_set = MovingShapesDataset(num_val, seed=seed + 1, **clip)

    @property
    def num_classes(self) -> int:
        return self.train_set.num_classes

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        """``(C, T, H, W)`` of one clip."""
        d = self.train_set
        return (3, d.num_frames, d.height, d.width)

    def data_parallel_shard(self) -> tuple[int, int]:
        """``(dp size, dp rank)`` of this process: from the Trainer's strategy when there is
        one (vidpar's shards over dp only), else from the current vidpar layout."""
        strategy = self.trainer.strategy if self.trainer is not None else None
        kwargs = getattr(strategy, "distributed_sampler_kwargs", None)
        if kwargs:
            return kwargs["num_replicas"], kwargs["rank"]
        dp = get_parallel_state().group("dp")
        return dp.world_size, dp.rank_in_group

    def _sampler(self, dataset: MovingShapesDataset, shuffle: bool) -> DataParallelSampler:
        replicas, rank = self.data_parallel_shard()
        return DataParallelSampler(dataset, replicas, rank, shuffle=shuffle, seed=self.seed)

    def train_dataloader(self) -> ResumableDataLoader:
        return ResumableDataLoader(
            self.train_set,
            self._sampler(self.train_set, shuffle=True),
            batch_size=self.batch_size,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            sampler=self._sampler(self.val_set, shuffle=False),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
