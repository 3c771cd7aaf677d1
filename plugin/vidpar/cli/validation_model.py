"""The model of ``vidpar-train``, checked in the main process before any worker starts:
its class and heads against the layout, its optimizer settings, a latents folder against
its sizes, and the memory of a training step against the machine's; each mistake is one
:class:`UserError` paragraph that names the override to change."""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from vidpar.cli.hydra_setup import UserError
from vidpar.config import ParallelConfig
from vidpar.models.parallelize import latent_widths
from vidpar.models.plan import check_heads
from vidpar.nn.activation_checkpointing import check_checkpointing
from vidpar.nn.dit import DiTConfig

#: The data modules whose keys :func:`vidpar.cli.validation.check_data` knows.
BUILT_IN_DATA = "vidpar.data.MovingShapesDataModule"
LATENTS_DATA = "vidpar.data.LatentsDataModule"


def model_patch_size(model: DictConfig | None) -> tuple[int, int, int]:
    """The DiT's ``patch_size`` in ``model`` (the default DiT's without one)."""
    dit = model.get("dit") if model is not None else None
    patch = dit.get("patch_size") if dit is not None else None
    return tuple(patch) if patch is not None else DiTConfig().patch_size


def diffusers_config(model: DictConfig) -> tuple[dict[str, Any], str]:
    """A diffusers model's ``config.json`` (``model.path``, ``model.subfolder``) and where
    it was read, with the model class checked against what vidpar parallelises."""
    from vidpar.models.parallelize import SUPPORTED_MODELS
    from vidpar.models.pretrained import find_model_folder, read_config

    path = None if OmegaConf.is_missing(model, "path") else model.get("path")
    try:
        folder = find_model_folder(path, model.get("subfolder"))
        config = read_config(folder)
    except (OSError, ValueError) as err:
        raise UserError(
            f"model.path: {err}. Give the local diffusers folder of the transformer (a "
            "pipeline folder with transformer/, or the model folder itself): nothing is "
            "downloaded."
        ) from None
    source = f"{folder}/config.json"
    if config["_class_name"] not in SUPPORTED_MODELS:
        raise UserError(
            f"model.path={path}: {source} is a {config['_class_name']}, which vidpar cannot "
            f"parallelise; it trains {', '.join(SUPPORTED_MODELS)}. Point model.path at such "
            "a model's folder."
        )
    return config, source


def model_facts(model: DictConfig) -> tuple[int, int, str]:
    """``(heads, in_channels, where they come from)`` of the configured network: the DiT's
    config, or a diffusers model folder's ``config.json`` (``model.path``)."""
    if "dit" in model:
        return model.dit.num_heads, model.dit.in_channels, "model.dit"
    config, source = diffusers_config(model)
    return config["num_attention_heads"], latent_widths(config)[0], source


def check_dit_config(dit: DictConfig, parallel: ParallelConfig) -> None:
    """``model.dit`` builds a DiTConfig, and its checkpointing works under the layout
    ``parallel``."""
    try:
        config = DiTConfig(**OmegaConf.to_container(dit, resolve=True))
        check_checkpointing(config.activation_checkpointing, parallel.ring)
    except (TypeError, ValueError) as err:
        raise UserError(f"model.dit: {err}") from None


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_optimizer(model: DictConfig) -> None:
    """The optimizer's settings in ``model``: ``lr`` > 0, ``weight_decay`` >= 0, and (where
    the module takes them) ``betas`` in [0, 1), ``eps`` > 0, ``ema_decay`` in [0, 1)."""
    lr = model.get("lr")
    if lr is not None and not (_is_number(lr) and lr > 0):
        raise UserError(
            f"model.lr={lr} is not a learning rate: set model.lr to a positive number "
            "(e.g. model.lr=1e-4)."
        )
    decay = model.get("weight_decay")
    if decay is not None and not (_is_number(decay) and decay >= 0):
        raise UserError(
            f"model.weight_decay={decay} must be a number of at least 0 (0: no weight decay). "
            "Set model.weight_decay."
        )
    betas = model.get("betas")
    if betas is not None and not (
        isinstance(betas, ListConfig | list | tuple)
        and len(betas) == 2
        and all(_is_number(b) and 0 <= b < 1 for b in betas)
    ):
        raise UserError(
            f"model.betas={betas} must be two numbers in [0, 1) (Adam's, e.g. "
            "model.betas=[0.9,0.999]). Set model.betas."
        )
    eps = model.get("eps")
    if eps is not None and not (_is_number(eps) and eps > 0):
        raise UserError(f"model.eps={eps} must be a positive number (e.g. 1e-8). Set model.eps.")
    ema = model.get("ema_decay")
    if ema is not None and not (_is_number(ema) and 0 <= ema < 1):
        raise UserError(
            f"model.ema_decay={ema} must be in [0, 1) (0 turns the EMA copy off). Set "
            "model.ema_decay."
        )


def check_model_before_launch(conf: DictConfig, parallel: ParallelConfig) -> None:
    """The model (its class, heads against the layout, DiT settings), its optimizer, the
    devices the layout needs, and a latents folder against the model's sizes."""
    heads, _, source = model_facts(conf.model)
    try:
        if "dit" in conf.model:
            parallel.check_heads(heads)
        else:  # a diffusers model: every rank of ulysses × tp needs a head
            check_heads(parallel, heads)
    except ValueError as err:
        raise UserError(f"The model does not fit the layout: {err} (from {source}).") from None
    if "dit" in conf.model:
        check_dit_config(conf.model.dit, parallel)
    check_optimizer(conf.model)
    if conf.trainer.accelerator == "gpu" and torch.cuda.device_count() < parallel.world_size:
        raise UserError(
            f"The layout {parallel.describe()} needs {parallel.world_size} GPUs, but this machine "
            f"has {torch.cuda.device_count()}. Use a smaller layout (e.g. parallel=sp2), or "
            "trainer=cpu to run the same layout with CPU processes."
        )
    data = conf.get("data")
    if (
        data is not None
        and data.get("_target_") == LATENTS_DATA
        and not OmegaConf.is_missing(data, "path")
        and data.path is not None
    ):
        check_latents_fit_model(data, conf.model)
    check_training_memory(conf, parallel)


def _sample_shape(data: DictConfig | None) -> tuple[int, ...] | None:
    """``(C, T, H, W)`` of one training sample, where the config says it."""
    if data is None:
        return None
    if data.get("_target_") == BUILT_IN_DATA:
        return (3, data.num_frames, data.height, data.width)
    if data.get("_target_") == LATENTS_DATA and not OmegaConf.is_missing(data, "path"):
        return _latents_dataset(data).latent_shape
    return None


def check_training_memory(conf: DictConfig, parallel: ParallelConfig) -> None:
    """A training step's memory by :mod:`vidpar.pipelines.preflight`'s conservative
    estimate (weights, gradients and Adam's moments over tp; one sample batch's
    activations over sp) against this machine's, before any worker starts."""
    from vidpar.pipelines.preflight import (
        FLOAT_BYTES,
        TRAIN_BYTES_PER_PARAM,
        PreflightError,
        check_memory,
        diffusers_sizes,
        token_count,
        transformer_bytes,
        transformer_params,
    )

    shape = _sample_shape(conf.get("data"))
    if shape is None:
        return
    model = conf.model
    if "dit" in model:
        dit = model.dit
        hidden, depth, patch = dit.hidden_size, dit.depth, model_patch_size(model)
        ffn = dit.get("ffn_dim") or int(hidden * dit.get("mlp_ratio", 4.0))
        checkpointing = bool(dit.get("activation_checkpointing"))
        ema = (model.get("ema_decay") or 0) > 0
    else:
        hidden, depth, ffn, patch = diffusers_sizes(diffusers_config(model)[0])
        checkpointing, ema = bool(model.get("gradient_checkpointing")), False
    c, t, h, w = shape
    batch = conf.data.batch_size
    params = transformer_params(hidden, depth, ffn)
    activations = transformer_bytes(
        batch, shape, patch, hidden, depth, parallel, training=True, checkpointing=checkpointing
    )
    per_worker = (
        params * (TRAIN_BYTES_PER_PARAM + (FLOAT_BYTES if ema else 0)) // parallel.tp
        + activations
        + batch * c * t * h * w * FLOAT_BYTES * 4
    )
    checkpoint_override = (
        "model.dit.activation_checkpointing=true"
        if "dit" in model
        else "model.gradient_checkpointing=true"
    )
    try:
        check_memory(
            per_worker,
            parallel.world_size,
            "cuda" if conf.trainer.accelerator == "gpu" else "cpu",
            "size",
            f"A training step of about {params / 1e6:.0f}M parameters on data.batch_size="
            f"{batch} samples of {token_count(shape, patch)} tokens ({c}×{t}×{h}×{w}) with {parallel.describe()}",
            f"Lower data.batch_size or the sample size, set {checkpoint_override}, or split "
            "the model over more devices (parallel.tp, parallel.sp)",
        )
    except PreflightError as err:
        raise UserError(f"{err}.") from None


def check_latents_fit_model(data: DictConfig, model: DictConfig) -> None:
    """Every file of the latents folder ``data.path``, read by header, against the model's
    ``in_channels`` and text width (``text_dim`` of a diffusers model)."""
    dataset = _latents_dataset(data)
    if "dit" in model:
        in_channels, text_dim, source = model.dit.in_channels, None, "model.dit"
    else:
        config, source = diffusers_config(model)
        in_channels, text_dim = latent_widths(config)
    try:
        dataset.check_model(in_channels, text_dim, f"the model ({source})")
    except ValueError as err:
        raise UserError(f"data.path: {err}. Change data.path or model.path.") from None


def _latents_dataset(data: DictConfig):
    from vidpar.data.latents import LatentsDataset

    try:
        return LatentsDataset(Path(data.path).expanduser())
    except (OSError, ValueError) as err:
        raise UserError(f"data.path={data.path}: {err}.") from None


def check_data_fits_model(video_shape: tuple[int, ...], model: DictConfig) -> None:
    """The clips' (or latents') channels must be what the model's patch embedding takes."""
    channels = video_shape[0]
    _, in_channels, source = model_facts(model)
    if channels != in_channels:
        fix = (
            f"Set model.dit.in_channels={channels}"
            if "dit" in model
            else f"Use a model folder whose transformer takes {channels} channels"
        )
        raise UserError(
            f"The data gives {channels}-channel clips of shape {tuple(video_shape)} (C, T, H, "
            f"W), but the model takes {in_channels} ({source}). {fix}, or use data whose "
            f"clips have {in_channels} channels."
        )
