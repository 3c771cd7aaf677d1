"""LightningDataModules over :class:`MovingShapesDataset` and :class:`LatentsDataset` (the
only Lightning import in ``vidpar.data``).

The dataloaders are plain ``DataLoader``s: under a distributed strategy Lightning
replaces their sampler with a ``DistributedSampler`` built from the strategy's
``distributed_sampler_kwargs`` (vidpar's shard over dp only), so every rank of one tp/sp
group sees the same batch.
"""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from vidpar.data.latents import LatentsDataset
from vidpar.data.moving_shapes import MovingShapesDataset


class MovingShapesDataModule(pl.LightningDataModule):
    """Train and validation splits of MovingShapes, with disjoint seeds.

    ``seed`` makes the training split; the validation split uses ``seed + 1``.
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

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return _loader(dataset, self.batch_size, shuffle, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


def _loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


class LatentsDataModule(pl.LightningDataModule):
    """A latents folder (:mod:`vidpar.data.latents`): its last ``num_val`` samples are the
    validation split (none: no validation), the others the training split.

    ``shuffle=False`` keeps the training order (with ``Trainer(use_distributed_sampler=
    False)`` every rank then reads the same batches: a run to compare layouts with).
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 1,
        num_val: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        total = len(LatentsDataset(path))
        if not 0 <= num_val < total:
            raise ValueError(
                f"num_val must be in [0, {total - 1}] for {total} samples, got {num_val}"
            )
        self.train_set = LatentsDataset(path, range(total - num_val))
        self.val_set = LatentsDataset(path, range(total - num_val, total))

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        """``(C, T, H, W)`` of one sample's latents."""
        return self.train_set.latent_shape

    def train_dataloader(self) -> DataLoader:
        return _loader(self.train_set, self.batch_size, self.shuffle, self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if not len(self.val_set):
            return []
        return _loader(self.val_set, self.batch_size, False, self.num_workers)
