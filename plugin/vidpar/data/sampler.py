"""Resumable data-parallel loading: a run stopped at any step and resumed from its
checkpoint sees exactly the batches of a run that never stopped.

:class:`DataParallelSampler` is a ``DistributedSampler`` (so Lightning leaves it in place)
whose order is a pure function of ``(seed, epoch)`` and whose next epoch can start part-way.
:class:`ResumableDataLoader` counts the samples its epoch has handed out and offers
``state_dict``/``load_state_dict``, which Lightning (2.1 and later) stores in every
checkpoint and restores on resume; the position is kept in global samples, so it means the
same under any dp size with the same global batch.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler


class DataParallelSampler(DistributedSampler):
    """This dp rank's share of ``dataset``: every ``num_replicas``-th item of one
    permutation drawn from ``seed + epoch`` (``shuffle``), padded to equal shares as
    ``DistributedSampler`` pads.

    :meth:`start_next_epoch_at` makes the next iteration skip the first items of this
    rank's share (once); ``len()`` stays the whole share, as Lightning counts batches of
    the whole epoch when it resumes one."""

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._skip = 0

    def start_next_epoch_at(self, items: int) -> None:
        """Skip the first ``items`` of this rank's share in the next iteration only."""
        if not 0 <= items <= self.num_samples:
            raise ValueError(f"cannot skip {items} items of a share of {self.num_samples}")
        self._skip = items

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`DataParallelSampler` that can save and restore its
    place in the epoch.

    ``state_dict()`` is ``{"epoch", "samples", "dataset_size", "seed", "shuffle"}``:
    ``samples`` counts the items that every dp rank together was handed in ``epoch``.
    After ``load_state_dict``, the next iteration of that epoch (the sampler's
    ``set_epoch``, which Lightning calls before each epoch, says which one it is) starts
    where the saved one stopped; an iteration of any other epoch starts at its beginning.
    """

    def __init__(self, dataset: Dataset, sampler: DataParallelSampler, **kwargs: Any) -> None:
        if not isinstance(sampler, DataParallelSampler):
            raise TypeError(f"ResumableDataLoader needs a DataParallelSampler, got {sampler!r}")
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._epoch = sampler.epoch
        self._samples = 0
        self._resume: tuple[int, int] | None = None  # (epoch, global samples) to start at

    def __iter__(self) -> Iterator[Any]:
        sampler: DataParallelSampler = self.sampler
        per_rank = 0
        if self._resume is not None and self._resume[0] == sampler.epoch:
            per_rank = self._resume[1] // sampler.num_replicas
        self._resume = None
        sampler.start_next_epoch_at(per_rank)
        self._epoch = sampler.epoch
        self._samples = per_rank * sampler.num_replicas
        for batch in super().__iter__():
            per_rank = min(per_rank + self.batch_size, sampler.num_samples)
            self._samples = per_rank * sampler.num_replicas
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler: DataParallelSampler = self.sampler
        epoch, samples = self._resume if self._resume is not None else (self._epoch, self._samples)
        return {
            "epoch": epoch,
            "samples": samples,
            "dataset_size": len(self.dataset),
            "seed": sampler.seed,
            "shuffle": sampler.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler: DataParallelSampler = self.sampler
        epoch, samples = int(state["epoch"]), int(state["samples"])
        saved = (state["dataset_size"], state["seed"], state["shuffle"])
        here = (len(self.dataset), sampler.seed, sampler.shuffle)
        if saved != here:
            warnings.warn(
                f"the checkpoint's data loader ran over {saved[0]} items with seed {saved[1]} "
                f"and shuffle={saved[2]}, this one over {here[0]} with seed {here[1]} and "
                f"shuffle={here[2]}: epoch {epoch} starts again from its beginning, so the "
                "resumed run does not repeat the batches of an uninterrupted one",
                stacklevel=2,
            )
            samples = 0
        elif samples % sampler.num_replicas:
            warnings.warn(
                f"the checkpoint's data loader stopped after {samples} samples of epoch {epoch}, "
                f"which {sampler.num_replicas} dp ranks cannot share evenly: the resumed epoch "
                "starts a few samples early (keep the global batch size to resume exactly)",
                stacklevel=2,
            )
        sampler.set_epoch(epoch)
        self._resume = (epoch, samples)
