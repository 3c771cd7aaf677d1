"""Exact resume: a run stopped at any step and resumed from its checkpoint takes the same
steps, bit for bit, as one that never stopped (built-in data and a user's stateful loader),
and the resumable loader's own bookkeeping."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_models import TINY_DIT
from resume_models import StepLog, UserLoaderDiT, read_steps
from vidpar.data import DataParallelSampler, MovingShapesDataModule, ResumableDataLoader
from vidpar.data.moving_shapes import MovingShapesDataset
from vidpar.lightning import VideoDiffusionModule, VidParStrategy

# dp2 × batch 2 = a global batch of 4; 24 clips = 6 steps per epoch.
STEPS, SAVE_EVERY = 10, 3


def tiny_data(num_train: int = 24) -> MovingShapesDataModule:
    return MovingShapesDataModule(
        num_train=num_train, num_val=2, batch_size=2, num_frames=2, height=8, width=8
    )


def tiny_module() -> VideoDiffusionModule:
    return VideoDiffusionModule(dit=TINY_DIT, lr=1e-2, num_sample_videos=0, ema_decay=0.9)


def fit(out: Path, model: pl.LightningModule, datamodule=None, ckpt_path=None, save=False):
    out.mkdir(parents=True, exist_ok=True)
    callbacks: list[pl.Callback] = [StepLog(str(out))]
    if save:  # every SAVE_EVERY steps, each checkpoint kept: step=3.ckpt, step=6.ckpt, ...
        callbacks.append(
            ModelCheckpoint(
                dirpath=out / "ckpt",
                filename="{step}",
                save_top_k=-1,
                every_n_train_steps=SAVE_EVERY,
            )
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=VidParStrategy(dp=2),
        max_steps=STEPS,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=save,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=out,
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    assert trainer.global_step == STEPS
    return [read_steps(out, rank) for rank in range(2)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list]:
    """Ten steps at dp2 on the built-in data, a checkpoint every three steps."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, fit(out, tiny_module(), tiny_data(), save=True)


@pytest.mark.parametrize(
    "step",
    [3, 6],
    ids=["mid_epoch_then_across_the_epoch_boundary", "at_the_end_of_an_epoch"],
)
def test_resume_repeats_the_uninterrupted_run_bit_for_bit(uninterrupted, step, tmp_path):
    out, reference = uninterrupted
    resumed = fit(
        tmp_path, tiny_module(), tiny_data(), ckpt_path=out / "ckpt" / f"step={step}.ckpt"
    )
    for rank in range(2):
        assert [s[0] for s in reference[rank]] == list(range(1, STEPS + 1))
        # The same samples in the same order, and the same float32 loss to the last bit.
        assert resumed[rank] == reference[rank][step:], rank
    # The two dp ranks share each global batch: different samples, all of one epoch.
    first_epoch = {i for rank in range(2) for s in reference[rank][:6] for i in s[2]}
    assert first_epoch == set(range(24))


def test_a_users_stateful_loader_resumes_exactly(tmp_path):
    reference = fit(tmp_path / "a", UserLoaderDiT(), save=True)
    ckpt = tmp_path / "a" / "ckpt" / f"step={SAVE_EVERY}.ckpt"
    resumed = fit(tmp_path / "b", UserLoaderDiT(), ckpt_path=ckpt)
    for rank in range(2):
        assert resumed[rank] == reference[rank][SAVE_EVERY:], rank


# The loader alone -----------------------------------------------------------------------


def loaders(dp: int, batch: int, dataset) -> list[ResumableDataLoader]:
    return [
        ResumableDataLoader(dataset, DataParallelSampler(dataset, dp, r, seed=7), batch_size=batch)
        for r in range(dp)
    ]


def global_batches(group: list[ResumableDataLoader], epoch: int) -> list[set[int]]:
    for loader in group:
        loader.sampler.set_epoch(epoch)
    return [
        {i for part in parts for i in part["index"].tolist()}
        for parts in zip(*[list(loader) for loader in group], strict=True)
    ]


def test_the_order_is_a_function_of_seed_and_epoch_shared_over_dp():
    dataset = MovingShapesDataset(12, num_frames=1, height=4, width=4)
    epoch0 = global_batches(loaders(2, 2, dataset), 0)
    assert epoch0 == global_batches(loaders(2, 2, dataset), 0)  # fresh loaders, same order
    assert set().union(*epoch0) == set(range(12)) and len(epoch0) == 3
    assert epoch0 != global_batches(loaders(2, 2, dataset), 1)
    # The global batch, not the dp size, decides what a step sees.
    assert epoch0 == global_batches(loaders(1, 4, dataset), 0)


def test_a_loader_resumes_mid_epoch_under_another_dp_size_and_then_starts_afresh():
    dataset = MovingShapesDataset(12, num_frames=1, height=4, width=4)
    group = loaders(2, 2, dataset)
    for loader in group:
        loader.sampler.set_epoch(1)
    iterators = [iter(loader) for loader in group]
    for it in iterators:
        next(it)
    state = group[0].state_dict()
    assert state == {"epoch": 1, "samples": 4, "dataset_size": 12, "seed": 7, "shuffle": True}
    single = loaders(1, 4, dataset)
    single[0].load_state_dict(state)
    assert single[0].state_dict() == state  # saved again before it ran: the same place
    expected = global_batches(loaders(2, 2, dataset), 1)
    assert global_batches(single, 1) == expected[1:]
    assert global_batches(single, 2) == global_batches(loaders(2, 2, dataset), 2)  # whole


def test_a_state_saved_at_the_end_of_an_epoch_starts_the_next_one_whole():
    dataset = MovingShapesDataset(8, num_frames=1, height=4, width=4)
    (done,) = loaders(1, 4, dataset)
    assert len(list(done)) == 2 and done.state_dict()["samples"] == 8
    (resumed,) = loaders(1, 4, dataset)
    resumed.load_state_dict(done.state_dict())
    assert len(resumed) == 2  # Lightning counts the whole epoch's batches
    assert global_batches([resumed], 1) == global_batches(loaders(1, 4, dataset), 1)


def test_a_state_from_other_data_restarts_the_epoch_with_a_warning():
    (loader,) = loaders(1, 4, MovingShapesDataset(8, num_frames=1, height=4, width=4))
    state = {"epoch": 0, "samples": 4, "dataset_size": 16, "seed": 7, "shuffle": True}
    with pytest.warns(UserWarning, match="starts again from its beginning"):
        loader.load_state_dict(state)
    assert len(list(loader)) == 2
