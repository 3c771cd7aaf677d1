"""``vidpar-train``'s values, checked in the main process before any worker starts: the
schedule, the checkpoint cadence, the data's sizes and the checkpoint to resume (the model
itself: :mod:`vidpar.cli.validation_model`); each mistake is one :class:`UserError`
paragraph that names the override to change. ``vidpar-generate``'s checks are
:mod:`vidpar.cli.validation_generate`."""

from __future__ import annotations

import numbers
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vidpar.cli.hydra_setup import UserError
from vidpar.cli.validation_model import (
    BUILT_IN_DATA,
    LATENTS_DATA,
    check_model_before_launch,
    model_patch_size,
)
from vidpar.config import ParallelConfig
from vidpar.data.moving_shapes import SHAPES
from vidpar.distributed.checkpoint import TRAINER_STATE, is_complete
from vidpar.distributed.checkpoint_integrity import CorruptCheckpointError, verify
from vidpar.distributed.checkpoint_signing import UntrustedCheckpointError
from vidpar.distributed.checkpoint_state import load_trainer_state
from vidpar.distributed.checkpoint_store import resolve
from vidpar.nn.dit import DiTConfig


def is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_train_config(conf: DictConfig, parallel: ParallelConfig) -> None:
    """Steps, epochs, validation and checkpoint cadence, and the data's sizes."""
    check_schedule(conf.trainer)
    check_checkpoint_cadence(conf.checkpoint, conf.trainer.max_steps)
    if conf.get("data") is not None:
        check_data(conf.data, conf.get("model"), parallel)


def check_schedule(trainer: DictConfig) -> None:
    """``trainer.max_steps``, ``max_epochs`` and ``val_check_interval``, as Lightning reads
    them: ``max_steps=-1`` trains for ``max_epochs`` epochs (-1: until stopped), and
    ``max_steps=0`` sets everything up but trains (and saves) nothing."""
    max_steps = trainer.get("max_steps", -1)
    if not is_int(max_steps) or max_steps < -1:
        raise UserError(
            f"trainer.max_steps={max_steps} is not a number of training steps. Set "
            "trainer.max_steps to the optimizer steps to take (e.g. trainer.max_steps=1000), "
            "or trainer.max_steps=-1 to train for trainer.max_epochs epochs instead "
            "(0 trains nothing)."
        )
    max_epochs = trainer.get("max_epochs")
    if max_epochs is not None and (not is_int(max_epochs) or max_epochs < -1):
        raise UserError(
            f"trainer.max_epochs={max_epochs} is not a number of epochs. Set "
            "trainer.max_epochs to a positive number, -1 for no limit, or null (Lightning's "
            "default of 1000 when trainer.max_steps=-1)."
        )
    if max_steps == -1 and max_epochs == -1:
        return  # Lightning's "until stopped": legal, if unusual
    _check_val_check_interval(trainer)


def _check_val_check_interval(trainer: DictConfig) -> None:
    interval = trainer.get("val_check_interval")
    per_epoch = trainer.get("check_val_every_n_epoch")
    if interval is None or isinstance(interval, str | DictConfig):
        return  # end of epoch, or a duration Lightning parses ("00:01:00:00", {minutes: 5})
    if is_int(interval):
        if interval >= 1:
            return
    elif isinstance(interval, float) and 0.0 < interval <= 1.0:
        if per_epoch is not None:
            return
        raise UserError(
            f"trainer.val_check_interval={interval} is a fraction of an epoch, but "
            "trainer.check_val_every_n_epoch=null counts validation in training steps. "
            "Give a number of steps (e.g. trainer.val_check_interval=200), or set "
            "trainer.check_val_every_n_epoch=1 to validate by epochs."
        )
    raise UserError(
        f"trainer.val_check_interval={interval} is not a validation interval. Set it to a "
        "positive number of training steps (e.g. trainer.val_check_interval=200); to turn "
        "validation off, set trainer.limit_val_batches=0 instead."
    )


def check_checkpoint_cadence(checkpoint: DictConfig, max_steps: int) -> None:
    """``checkpoint.keep_last`` (at least 1), ``checkpoint.every_n_minutes`` (a positive
    number of minutes, or null) and ``checkpoint.every_n_train_steps``: null (after every
    epoch), 0 (never) or a positive number of steps that the run reaches."""
    keep = checkpoint.get("keep_last", 1)
    if not is_int(keep) or keep < 1:
        raise UserError(
            f"checkpoint.keep_last={keep} is not a number of checkpoint versions to keep. Set "
            "checkpoint.keep_last to 1 (only the newest) or more."
        )
    minutes = checkpoint.get("every_n_minutes")
    if minutes is not None and (
        not isinstance(minutes, int | float) or isinstance(minutes, bool) or minutes <= 0
    ):
        raise UserError(
            f"checkpoint.every_n_minutes={minutes} is not a number of minutes. Set it to a "
            "positive number (checkpoint.every_n_minutes=30 saves last.ckpt every half "
            "hour of training), or null for no time-based saves."
        )
    every = checkpoint.get("every_n_train_steps")
    if every is None:
        return
    if not is_int(every) or every < 0:
        raise UserError(
            f"checkpoint.every_n_train_steps={every} is not a checkpoint interval. Set it to a "
            "positive number of training steps, 0 for no checkpoints, or leave it out for one "
            "checkpoint at trainer.max_steps."
        )
    if max_steps > 0 and every > max_steps:
        raise UserError(
            f"checkpoint.every_n_train_steps={every} is more than trainer.max_steps="
            f"{max_steps}, so the run would never save. Set checkpoint.every_n_train_steps "
            f"to at most {max_steps} (0 saves nothing on purpose)."
        )


def check_data(data: DictConfig, model: DictConfig | None, parallel: ParallelConfig) -> None:
    """The built-in data's sizes: a batch for every dp replica, clips the dataset can draw
    and the model's patch divides."""
    target = data.get("_target_")
    if target == LATENTS_DATA:
        _check_latents_folder(data)
        _check_at_least(data, (("batch_size", 1), ("num_workers", 0), ("num_val", 0)))
    if target != BUILT_IN_DATA:
        return
    _check_at_least(data, (("batch_size", 1), ("num_workers", 0), ("num_val", 1)))
    batch, dp = data.batch_size, parallel.dp
    if not is_int(data.num_train) or data.num_train < batch * dp:
        raise UserError(
            f"data.num_train={data.num_train} clips cannot fill one global batch of "
            f"data.batch_size={batch} per replica × dp={dp} = {batch * dp} clips. Set "
            f"data.num_train to at least {batch * dp}, or lower data.batch_size."
        )
    classes = data.get("num_classes")
    if not is_int(classes) or not 1 <= classes <= len(SHAPES):
        raise UserError(
            f"data.num_classes={classes}: the moving-shapes data has one class per shape, "
            f"1 to {len(SHAPES)} ({', '.join(SHAPES)}). Set data.num_classes in that range."
        )
    patch = model_patch_size(model)
    for axis, key in enumerate(("num_frames", "height", "width")):
        value, low = data.get(key), 1 if key == "num_frames" else 4
        if not is_int(value) or value < low:
            raise UserError(f"data.{key}={value} must be an integer of at least {low}.")
        if value % patch[axis]:
            raise UserError(
                f"data.{key}={value} is not divisible by the model's patch size "
                f"model.dit.patch_size={list(patch)} (axis {axis}). Set data.{key} to a "
                f"multiple of {patch[axis]}, or change model.dit.patch_size."
            )


def _check_latents_folder(data: DictConfig) -> None:
    path = None if OmegaConf.is_missing(data, "path") else data.path
    if path is None or not Path(path).expanduser().is_dir():
        given = "no data.path" if path is None else f"data.path={path} is not a folder"
        raise UserError(
            f"{given}: the latents data trains on a folder of precomputed latents and text "
            "embeddings (vidpar.data.write_latents_folder writes one). Set "
            "data.path=/path/to/latents, or data=moving_shapes for the built-in clips."
        )


def _check_at_least(data: DictConfig, bounds: tuple[tuple[str, int], ...]) -> None:
    for key, low in bounds:
        value = data.get(key)
        if not is_int(value) or value < low:
            raise UserError(
                f"data.{key}={value} must be an integer of at least {low}. Set data.{key}."
            )


# The checkpoint to resume --------------------------------------------------------------


def check_before_launch(conf: DictConfig, parallel: ParallelConfig) -> None:
    """Every mistake we can see from the config and its files fails here, before any
    process starts: the model, its optimizer and devices, the data against the model, and
    the checkpoint to resume (:func:`check_train_config` checks the run's settings)."""
    check_model_before_launch(conf, parallel)
    check_resume(conf)


def check_resume(conf: DictConfig) -> None:
    """``ckpt_path``: a complete checkpoint, intact, signed by this user (or trusted), of the
    model the config describes."""
    if conf.ckpt_path is None:
        return
    if not is_complete(Path(conf.ckpt_path)):
        raise UserError(
            f"ckpt_path={conf.ckpt_path} is not a complete vidpar checkpoint (a directory with "
            "trainer_state.pt and DCP metadata). Point it at a checkpoints/*.ckpt directory "
            "of an earlier run, or drop ckpt_path to start fresh."
        )
    ckpt = resolve(conf.ckpt_path)
    try:  # the signature, every file's size and checksums, before any worker starts
        verify(ckpt, trust=bool(conf.get("trust_checkpoint", False)))
    except (CorruptCheckpointError, UntrustedCheckpointError) as err:
        raise UserError(str(err)) from None
    check_checkpoint_model(ckpt, conf.model)


#: DiT settings that change how it runs, not its weights: free to differ on resume.
RESUMABLE_DIT_CHANGES = frozenset({"activation_checkpointing", "compile"})


def check_checkpoint_model(ckpt: Path, model: DictConfig) -> None:
    """A checkpoint resumes only into the model it was written by: name the settings that
    differ (DiT sizes, and whether there is an EMA copy) as command-line overrides."""
    try:
        hparams = load_trainer_state(ckpt / TRAINER_STATE).get("hyper_parameters", {})
    except ValueError as err:
        raise UserError(f"ckpt_path={ckpt}: {err}") from None
    if "dit" not in hparams or "dit" not in model:
        return
    saved = asdict(DiTConfig.from_saved(hparams["dit"]))
    wanted = asdict(DiTConfig(**OmegaConf.to_container(model.dit, resolve=True)))
    overrides = [
        f"model.dit.{key}={_as_override(saved[key])}"
        for key in saved
        if saved[key] != wanted[key] and key not in RESUMABLE_DIT_CHANGES
    ]
    saved_ema = hparams.get("ema_decay", 0.0)
    if (saved_ema > 0) != (model.get("ema_decay", 0.0) > 0):
        overrides.append(f"model.ema_decay={saved_ema}")
    if overrides:
        raise UserError(
            f"ckpt_path={ckpt} was written by a different model than the config describes. "
            f"Resume with its settings ({' '.join(overrides)}), or drop ckpt_path to start "
            "fresh."
        )


def _as_override(value: object) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, tuple | list) else str(value)
