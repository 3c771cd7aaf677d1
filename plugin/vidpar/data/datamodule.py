"""LightningDataModules over :class:`MovingShapesDataset` and :class:`LatentsDataset` (the
only Lightning import in ``vidpar.data``).

Every split is sharded over dp only, by vidpar's own :class:`DataParallelSampler` (a
``DistributedSampler``, so Lightning leaves it in place, whatever
``use_distributed_sampler`` says), hence every rank of one tp/sp group sees the same
batch. Training loaders are :class:`ResumableDataLoader`\\ s: their place in the epoch is
saved in checkpoints, and a run resumed mid-epoch sees the batches of an uninterrupted one.
"""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from vidpar.data.latents import LatentsDataset
from vidpar.data.moving_shapes import MovingShapesDataset
from vidpar.data.sampler import DataParallelSampler, ResumableDataLoader
from vidpar.distributed.state import get_parallel_state


class _ShardedDataModule(pl.LightningDataModule):
    """Loaders sharded over dp, the training one resumable; subclasses set ``batch_size``,
    ``num_workers`` and ``seed``."""

    batch_size: int
    num_workers: int
    seed: int

    def data_parallel_shard(self) -> tuple[int, int]:
        """``(dp size, dp rank)`` of this process: from the Trainer's strategy when there is
        one (vidpar's shards over dp only), else from the current vidpar layout."""
        strategy = self.trainer.strategy if self.trainer is not None else None
        kwargs = getattr(strategy, "distributed_sampler_kwargs", None)
        if kwargs:
            return kwargs["num_replicas"], kwargs["rank"]
        dp = get_parallel_state().group("dp")
        return dp.world_size, dp.rank_in_group

    def _sampler(self, dataset: Dataset, shuffle: bool) -> DataParallelSampler:
        replicas, rank = self.data_parallel_shard()
        return DataParallelSampler(dataset, replicas, rank, shuffle=shuffle, seed=self.seed)

    def _train_loader(self, dataset: Dataset, shuffle: bool) -> ResumableDataLoader:
        return ResumableDataLoader(
            dataset,
            self._sampler(dataset, shuffle),
            batch_size=self.batch_size,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _val_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._sampler(dataset, shuffle=False),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class MovingShapesDataModule(_ShardedDataModule):
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

    def train_dataloader(self) -> ResumableDataLoader:
        return self._train_loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._val_loader(self.val_set)


class LatentsDataModule(_ShardedDataModule):
    """A latents folder (:mod:`vidpar.data.latents`): its last ``num_val`` samples are the
    validation split (none: no validation), the others the training split.

    ``shuffle`` draws the training order from ``(seed, epoch)``; ``shuffle=False`` keeps
    the folder's order (at dp = 1 every rank then reads the same batches: a run to compare
    layouts with). ``batch_size`` is per dp replica.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 1,
        num_val: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # Lightning logs the module's and the datamodule's hparams as one dict and refuses a
        # key with two values: DiffusersFlowModule's `path` is the model folder.
        self.save_hyperparameters(ignore="path")
        self.hparams.latents_path = path
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        samples = LatentsDataset(path)  # every file's header checked, once
        total = len(samples)
        if not 0 <= num_val < total:
            raise ValueError(
                f"num_val must be in [0, {total - 1}] for {total} samples, got {num_val}"
            )
        self.train_set = samples.subset(range(total - num_val))
        self.val_set = samples.subset(range(total - num_val, total))

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        """``(C, T, H, W)`` of one sample's latents."""
        return self.train_set.latent_shape

    def train_dataloader(self) -> ResumableDataLoader:
        return self._train_loader(self.train_set, self.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        if not len(self.val_set):
            return []
        return self._val_loader(self.val_set)
