"""VidParStrategy meets the groups already in place: it takes them when they are its own
layout, and raises naming both layouts when they are not (never rebuilding them)."""

from __future__ import annotations

import lightning.pytorch as pl

from vidpar.config import ParallelConfig
from vidpar.distributed import state as ps
from vidpar.lightning import VidParStrategy

IN_PLACE = ParallelConfig(tp=2)


def _set_up(strategy: VidParStrategy) -> tuple[str, bool]:
    """Inside a rank of a world whose ``IN_PLACE`` groups are built: the strategy's
    ``setup_environment`` under a real Trainer; its error (if any), and whether the groups
    in place are still the ones there before."""
    before = ps.get_parallel_state()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False
    )
    try:
        trainer.strategy.setup_environment()
        error = ""
    except ValueError as err:
        error = str(err)
    return error, ps.get_parallel_state() is before


def test_the_strategy_takes_its_own_groups_and_refuses_another_layouts(worlds) -> None:
    world = worlds(2)
    same = world.run(_set_up, VidParStrategy(tp=2), layout=IN_PLACE)
    assert same == [("", True)] * 2
    other = world.run(_set_up, VidParStrategy(sp=2), layout=IN_PLACE)
    for error, kept in other:
        assert kept
        assert "dp1 × cfg1 × ring1 × ulysses2 × tp1 = 2" in error  # the strategy's
        assert "dp1 × cfg1 × ring1 × ulysses1 × tp2 = 2" in error  # the groups in place
