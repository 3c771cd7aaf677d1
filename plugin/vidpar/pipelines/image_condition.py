"""The image of image-to-video, as diffusers' ``WanImageToVideoPipeline`` uses it: read
once in the parent (a file or an array), then on each rank the CLIP image tokens (Wan2.1
I2V) and the VAE-encoded first frame with its mask (Wan2.1/2.2 I2V) or, for Wan2.2 TI2V
(``expand_timesteps``), the first latent frame that stays fixed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


def read_image(image):
    """A PIL RGB image from a file path, a PIL image, or an ``[H, W, 3]`` array (uint8, or
    float in [0, 1]); ``ValueError`` naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, str | os.PathLike):
        path = Path(image).expanduser()
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"image={image} cannot be read as an image: {err}") from None
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"an image array must be [H, W, 3], got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array)


@dataclass
class ImageCondition:
    """What the transformer gets besides the noisy latents, for a batch of ``B`` videos."""

    #: ``[B, mask + C, T, h, w]`` concatenated to the latents (I2V), or the first frame's
    #: latents ``[B, C, 1, h, w]`` (TI2V).
    latents: torch.Tensor
    #: TI2V: ``[1, 1, T, h, w]``, 0 on the first latent frame (kept), 1 elsewhere.
    first_frame_mask: torch.Tensor | None
    #: Wan2.1 I2V: the CLIP image tokens ``[B, N, D]``.
    image_embeds: torch.Tensor | None


def load_image_encoder(folder: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The ``transformers`` image encoder of ``image_encoder/`` (e.g. ``CLIPVisionModel``)."""
    import json

    import transformers

    name = json.loads((folder / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, name).from_pretrained(
        os.fspath(folder), torch_dtype=dtype, use_safetensors=True, local_files_only=True
    )
    return model.to(device).eval().requires_grad_(False)


def load_image_processor(folder: Path):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(os.fspath(folder), local_files_only=True)


def image_tokens(processor, encoder: nn.Module, image, batch: int) -> torch.Tensor:
    """CLIP's penultimate hidden states of ``image``, repeated ``batch`` times."""
    param = next(encoder.parameters())
    pixels = processor(images=image, return_tensors="pt").to(param.device)
    hidden = encoder(**pixels, output_hidden_states=True).hidden_states[-2]
    return hidden.repeat(batch, 1, 1)


def encode_first_frame(
    vae: nn.Module,
    image,
    batch: int,
    num_frames: int,
    height: int,
    width: int,
    expand_timesteps: bool,
    temporal_factor: int,
    spatial_factor: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(condition, first_frame_mask)`` of ``WanImageToVideoPipeline.prepare_latents``."""
    from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents
    from diffusers.video_processor import VideoProcessor

    pixels = VideoProcessor(vae_scale_factor=spatial_factor).preprocess(
        image, height=height, width=width
    )
    pixels = pixels.to(device, torch.float32).unsqueeze(2)
    video = pixels
    if not expand_timesteps:
        video = torch.cat(
            [pixels, pixels.new_zeros(*pixels.shape[:2], num_frames - 1, height, width)], 2
        )
    param = next(vae.parameters())
    z = retrieve_latents(vae.encode(video.to(param.device, param.dtype)), sample_mode="argmax")
    z = z.repeat(batch, 1, 1, 1, 1).to(device, torch.float32)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(z)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z)
    z = (z - mean) * inv_std
    frames, h, w = (
        (num_frames - 1) // temporal_factor + 1,
        height // spatial_factor,
        width // spatial_factor,
    )
    if expand_timesteps:
        first = torch.ones(1, 1, frames, h, w, dtype=torch.float32, device=device)
        first[:, :, 0] = 0
        return z, first
    mask = torch.ones(batch, 1, num_frames, h, w)
    mask[:, :, 1:] = 0
    mask = torch.cat([mask[:, :, :1].repeat_interleave(temporal_factor, dim=2), mask[:, :, 1:]], 2)
    mask = mask.view(batch, -1, temporal_factor, h, w).transpose(1, 2).to(z.device)
    return torch.cat([mask, z], dim=1), None
