"""The denoising loop of diffusers' Wan pipelines, run on every rank of a layout: the
scheduler the folder names, diffusers' guidance and timesteps, Wan2.2's ``transformer_2``
below ``boundary_ratio``, TI2V's per-token timesteps, and under cfg2 the conditional and
unconditional passes on the two cfg ranks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vidpar.distributed.state import get_cfg_group
from vidpar.pipelines.image_condition import ImageCondition
from vidpar.pipelines.pipeline_folder import PipelineFolder


def load_scheduler(folder: Path):
    """The diffusers scheduler a pipeline's ``scheduler/`` folder names, as saved."""
    import diffusers

    name = json.loads((folder / "scheduler_config.json").read_text())["_class_name"]
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"{folder}/scheduler_config.json names {name!r}, unknown to diffusers")
    return cls.from_pretrained(str(folder))


def denoise(worker, latents, cond, null, image: ImageCondition | None, request) -> torch.Tensor:
    """diffusers' denoising loop over the folder's scheduler; under cfg2 the two cfg ranks
    run the conditional and unconditional passes and all-gather the predictions."""
    spec: PipelineFolder = worker.pipeline_spec
    scheduler = worker.scheduler  # the folder's (load_scheduler), reused as diffusers does
    scheduler.set_timesteps(request["steps"], device=worker.device)
    scheduler.set_begin_index(0)
    ratio = spec.settings["boundary_ratio"]
    boundary = None if ratio is None else ratio * scheduler.config.num_train_timesteps
    guided = request["guidance_scale"] > 1.0
    cfg = get_cfg_group()
    split = guided and cfg.world_size == 2
    first = image.first_frame_mask if image is not None else None
    if spec.settings["expand_timesteps"] and first is None:  # TI2V without an image
        first = torch.ones(1, 1, *latents.shape[2:], device=latents.device)
    extra = {}
    if image is not None and image.image_embeds is not None:
        extra["encoder_hidden_states_image"] = image.image_embeds
    high = worker.transformers.get("transformer", worker.transformers.get("transformer_2"))
    # diffusers' transformer_dtype (fp32-kept modules aside), read once and not every step
    dtypes = {id(m): m.dtype for m in worker.transformers.values()}
    for t in scheduler.timesteps:
        if boundary is None or t >= boundary:
            model, scale = high, request["guidance_scale"]
        else:
            model, scale = worker.transformers["transformer_2"], request["guidance_scale_2"]
        dtype = dtypes[id(model)]
        if first is not None:  # a timestep per token, 0 where the first frame is kept
            x = latents if image is None else (1 - first) * image.latents + first * latents
            timestep = (first[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0)
            timestep = timestep.expand(latents.shape[0], -1)
        else:
            x = latents if image is None else torch.cat([latents, image.latents], dim=1)
            timestep = t.expand(latents.shape[0])
        x = x.to(dtype)
        kwargs = {k: v.to(dtype) for k, v in extra.items()}

        def predict(embeds, model=model, x=x, timestep=timestep, kwargs=kwargs):
            hidden = embeds.to(x.dtype)
            return model(x, timestep, hidden, return_dict=False, **kwargs)[0]

        if split:
            mine = predict(null if cfg.rank_in_group else cond)
            noise_pred, noise_uncond = cfg.all_gather(mine.unsqueeze(0), dim=0).unbind(0)
        else:
            noise_pred = predict(cond)
            noise_uncond = predict(null) if guided else None
        if guided:
            noise_pred = noise_uncond + scale * (noise_pred - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    if image is not None and first is not None:
        latents = (1 - first) * image.latents + first * latents
    return latents
