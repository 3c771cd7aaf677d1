"""A family's forward as a flow-matching velocity: the per-family data (and small functions)
that turn vidpar's ``(x_t, t, prompt embeddings)`` into the diffusers model's own call.

vidpar's convention (:mod:`vidpar.pipelines.flow_matching`): ``x_t = (1 - t) x0 + t noise``,
``t`` in [0, 1] (noise at 1), velocity ``noise - x0``. Wan, SkyReels-V2, LTX-Video and
HunyuanVideo take ``timestep = 1000 t`` and predict that velocity, as their pipelines'
flow-matching schedulers step; Mochi's scheduler runs inverted sigmas (``timestep = 1000
(1 - t)``) and its model predicts ``x0 - noise``. What else a family's forward takes that a
latents folder does not hold is filled as its pipeline fills it by default (the text mask
of the prompts' zero padding, HunyuanVideo's guidance 6.0; its pooled CLIP projection,
which latents folders do not store, as zeros; HunyuanVideo 1.5's text-to-video inputs:
no conditioning latents, no image, no quoted glyph text for its ByT5 encoder).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "PLAIN_FORWARD",
    "FlowForward",
    "hunyuan_video_15_inputs",
    "hunyuan_video_inputs",
    "text_mask",
]

#: Extra keyword inputs of a family's forward from its config, the latents and the text.
ExtraInputs = Callable[[Mapping[str, Any], torch.Tensor, torch.Tensor], dict[str, Any]]


def text_mask(config: Mapping[str, Any], x: torch.Tensor, text: torch.Tensor) -> dict:
    """The text mask of prompts zero-padded at the end (as a latents folder pads them): a
    token is real unless its embedding is all zeros, and the first always is (a tokenizer
    gives an empty prompt its end token; a prompt of no tokens would attend nothing)."""
    real = text.ne(0).any(-1)
    real[:, 0] = True
    return {"encoder_attention_mask": real.to(x.dtype)}


def hunyuan_video_inputs(config: Mapping[str, Any], x: torch.Tensor, text: torch.Tensor) -> dict:
    """HunyuanVideo's: a full text mask, zeros for the pooled CLIP projection, and the
    pipeline's default embedded guidance (6.0, times 1000) where the model embeds one."""
    batch = x.shape[0]
    inputs = text_mask(config, x, text)
    inputs["pooled_projections"] = x.new_zeros(batch, config["pooled_projection_dim"])
    if config.get("guidance_embeds", True):
        inputs["guidance"] = torch.full((batch,), 6000.0, device=x.device, dtype=x.dtype)
    return inputs


def hunyuan_video_15_inputs(config: Mapping[str, Any], x: torch.Tensor, text: torch.Tensor) -> dict:
    """HunyuanVideo 1.5's text-to-video inputs, as its pipeline gives a prompt without
    quoted text: the text mask, one masked-out ByT5 token and one all-zero image token
    (the model's sign of text to video)."""
    batch = x.shape[0]
    inputs = text_mask(config, x, text)
    inputs["encoder_hidden_states_2"] = x.new_zeros(batch, 1, config["text_embed_2_dim"])
    inputs["encoder_attention_mask_2"] = x.new_zeros(batch, 1)
    inputs["image_embeds"] = x.new_zeros(batch, 1, config["image_embed_dim"])
    return inputs


@dataclass(frozen=True)
class FlowForward:
    """How a family's model is called as the velocity of a flow-matching step."""

    #: Mochi: ``timestep = 1000 (1 - t)``, the output ``x0 - noise`` (negated).
    inverted: bool = False
    #: LTX: the latents ``[B, C, T, H, W]`` go in as tokens ``[B, T·H·W, C]`` (patch 1)
    #: with their grid, and the output comes back as latents.
    tokens: bool = False
    #: HunyuanVideo 1.5: the latents go in with zero conditioning latents and a zero mask
    #: channel after them (text to video: ``in_channels = 2 C + 1``).
    conditioned: bool = False
    #: Further inputs of the forward (:data:`ExtraInputs`).
    extra: ExtraInputs | None = None
    #: Constant keyword inputs (LTX's rope interpolation scale of its pipeline).
    constants: Mapping[str, Any] = field(default_factory=dict)
    #: The config entry of the prompt embeddings' width.
    text_dim: str = "text_dim"
    #: HunyuanVideo 1.5: the timestep goes in the latents' dtype, as its pipeline passes
    #: it (the model embeds it in the timestep's own dtype, so a float32 timestep fails
    #: against bf16 weights).
    timestep_in_latents_dtype: bool = False

    def latent_channels(self, config: Mapping[str, Any]) -> int:
        """The channels of the latents the model denoises (its ``in_channels``, less the
        conditioning ones)."""
        channels = config["in_channels"]
        return (channels - 1) // 2 if self.conditioned else channels

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        timestep_scale: float = 1000.0,
    ) -> torch.Tensor:
        """The velocity ``noise - x0`` at flow time ``t`` ``[B]`` of latents ``x``
        ``[B, C, T, H, W]`` with prompt embeddings ``text`` ``[B, L, D]``."""
        config = model.config
        # The timestep stays in t's dtype (float32 or wider), unless the family's pipeline
        # passes it in the latents' dtype: 1000·t in bf16 would be coarse.
        timestep = (1 - t if self.inverted else t) * timestep_scale
        if self.timestep_in_latents_dtype:
            timestep = timestep.to(x.dtype)
        inputs = dict(self.constants)
        hidden = x
        if self.tokens:
            if config.get("patch_size", 1) != 1 or config.get("patch_size_t", 1) != 1:
                raise ValueError(
                    f"{type(model).__name__} with patches of more than one latent: vidpar "
                    "packs LTX latents as tokens of one latent each (LTX-Video's patch 1)"
                )
            frames, height, width = x.shape[2:]
            hidden = x.flatten(2).transpose(1, 2)
            inputs |= {"num_frames": frames, "height": height, "width": width}
        if self.conditioned:
            hidden = torch.cat([x, torch.zeros_like(x), torch.zeros_like(x[:, :1])], 1)
        if self.extra is not None:
            inputs |= self.extra(config, x, text)
        out = model(
            hidden_states=hidden,
            timestep=timestep,
            encoder_hidden_states=text.to(x.dtype),
            return_dict=False,
            **inputs,
        )[0]
        if self.tokens:
            out = out.transpose(1, 2).unflatten(2, x.shape[2:])
        return -out if self.inverted else out


#: Wan's and SkyReels-V2's forward: ``model(x_t, 1000 t, text)``, velocity out.
PLAIN_FORWARD = FlowForward()
