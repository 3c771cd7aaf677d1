"""The command-line values of ``vidpar-train`` and ``vidpar-generate``, checked in the main
process before any worker starts; each mistake is one :class:`UserError` paragraph that
names the override to change."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from vidpar.cli.hydra_setup import UserError
from vidpar.config import ParallelConfig
from vidpar.data.moving_shapes import SHAPES
from vidpar.nn.dit import DiTConfig

#: The data modules whose keys :func:`check_data` knows.
BUILT_IN_DATA = "vidpar.data.MovingShapesDataModule"
LATENTS_DATA = "vidpar.data.LatentsDataModule"


def is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# vidpar-train ----------------------------------------------------------------------------


def check_train_config(conf: DictConfig, layout: ParallelConfig) -> None:
    """Steps, epochs, validation and checkpoint cadence, and the data's sizes."""
    check_schedule(conf.trainer)
    check_checkpoint_cadence(conf.checkpoint, conf.trainer.max_steps)
    if conf.get("data") is not None:
        check_data(conf.data, conf.get("model"), layout)


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
    """``checkpoint.keep_last`` (at least 1), and ``checkpoint.every_n_train_steps``: null
    (after every epoch), 0 (never) or a positive number of steps that the run reaches."""
    keep = checkpoint.get("keep_last", 1)
    if not is_int(keep) or keep < 1:
        raise UserError(
            f"checkpoint.keep_last={keep} is not a number of checkpoint versions to keep. Set "
            "checkpoint.keep_last to 1 (only the newest) or more."
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


def check_data(data: DictConfig, model: DictConfig | None, layout: ParallelConfig) -> None:
    """The built-in data's sizes: a batch for every dp replica, clips the dataset can draw
    and the model's patch divides."""
    target = data.get("_target_")
    if target == LATENTS_DATA:
        _check_latents_folder(data)
        _check_at_least(data, (("batch_size", 1), ("num_workers", 0), ("num_val", 0)))
    if target != BUILT_IN_DATA:
        return
    _check_at_least(data, (("batch_size", 1), ("num_workers", 0), ("num_val", 1)))
    batch, dp = data.batch_size, layout.dp
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


def model_patch_size(model: DictConfig | None) -> tuple[int, int, int]:
    dit = model.get("dit") if model is not None else None
    patch = dit.get("patch_size") if dit is not None else None
    return tuple(patch) if patch is not None else DiTConfig().patch_size


# vidpar-generate -------------------------------------------------------------------------

#: The ``vidpar-generate`` override of each argument of ``VideoGenerator.generate``.
GENERATE_OVERRIDES = {"prompt_or_class": "labels"}


def generate_labels(labels: Any) -> list[int | str]:
    """``labels=[0,1]``, ``labels=[circle,square]`` or a single ``labels=2`` / ``labels=ring``
    as a list (a bare string is one class, not its letters)."""
    if isinstance(labels, ListConfig):
        return list(OmegaConf.to_container(labels))
    if isinstance(labels, list | tuple):
        return list(labels)
    return [labels]


def check_generate_request(
    conf: DictConfig, dit_config: DiTConfig, data_info: Mapping[str, Any]
) -> tuple[list[int], tuple[int, int, int, int]]:
    """Every argument of the generation ``conf`` asks for, checked against the model the
    checkpoint holds; returns the labels and video shape ``(C, T, H, W)``."""
    from vidpar.pipelines.generator import RequestError, plan_request

    try:
        return plan_request(
            dit_config,
            data_info,
            generate_labels(conf.labels),
            num_frames=conf.num_frames,
            height=conf.height,
            width=conf.width,
            steps=conf.steps,
            guidance_scale=conf.guidance_scale,
            seed=conf.seed,
            output=conf.output,
        )
    except RequestError as err:
        key = GENERATE_OVERRIDES.get(err.argument, err.argument)
        raise UserError(f"{key}={conf[key]} cannot be generated: {err}. Change {key}.") from None


def check_generate_resources(
    conf: DictConfig,
    dit_config: DiTConfig,
    layout: ParallelConfig,
    labels: list[int],
    shape: tuple[int, int, int, int],
) -> None:
    """``output`` can be written (folder, permissions, free space for the video) and the
    sampling fits this machine's memory, before the generator starts its workers."""
    from vidpar.pipelines.preflight import check_generation

    preflight(
        check_generation,
        dit_config,
        len(labels),
        shape,
        layout,
        guided=conf.guidance_scale != 1.0,
        output=conf.output,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )


def preflight(check, *args, **kwargs) -> None:
    """Run a :mod:`vidpar.pipelines.preflight` check (output path, memory) before the
    workers start; its failure becomes a :class:`UserError` naming what to change."""
    from vidpar.pipelines.preflight import PreflightError

    try:
        check(*args, **kwargs)
    except PreflightError as err:
        if err.argument == "output":
            raise UserError(f"{err}. Change output (e.g. output=samples.mp4).") from None
        raise UserError(f"{err}.") from None
