"""diffusers' ``HunyuanVideoTransformer3DModel`` (HunyuanVideo T2V) and
``HunyuanVideo15Transformer3DModel`` (HunyuanVideo 1.5: dual-stream blocks only, padded
text tokens masked as queries too) on a vidpar layout: their plans and joint-attention
processors.

HunyuanVideo attends video and text tokens jointly in both of its block kinds: the
dual-stream blocks (``transformer_blocks``: the text has its own projections ``add_*_proj``
and output ``to_add_out``) and the single-stream blocks (``single_transformer_blocks``: one
set of projections over ``[video; text]``). Under sp the video tokens are split (after the
patch embedding, with the rotary embedding) and the text stays whole on every rank; each
rank attends its video queries and all text queries to every video key and the prompt's
real text keys (:meth:`~vidpar.models.plan.PlanProcessor.joint_attention`: padded text
keys, from the text mask, are left out per sample, or by a score bias in compiled
blocks).

Under tp the heads are split (``to_q/to_k/to_v``, ``add_*_proj`` column-parallel;
``to_out.0``, ``to_add_out`` row-parallel) and the dual-stream FFNs (``ff``,
``ff_context``); the per-head RMSNorms stay whole with their gradients summed over tp. A
single-stream block's ``proj_out`` reads the attention output and its MLP side by side,
so there the attention output is gathered over tp and ``proj_mlp``/``proj_out`` stay
replicated. The text refiner (``context_embedder``) and the embeddings stay replicated.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from vidpar.models.flow_forward import (
    FlowForward,
    hunyuan_video_15_inputs,
    hunyuan_video_inputs,
)
from vidpar.models.plan import AttentionCall, Gather, ModelPlan, PlanProcessor, Split, split_layers
from vidpar.models.sequence import rotate_pairs
from vidpar.models.tensor_parallel import shared_over

__all__ = [
    "HUNYUAN_VIDEO_15_PLAN",
    "HUNYUAN_VIDEO_PLAN",
    "HunyuanVideo15AttnProcessor",
    "HunyuanVideoAttnProcessor",
]


class HunyuanVideoAttnProcessor(PlanProcessor):
    """HunyuanVideo's joint attention on a layout (see the module doc)."""

    def _project(
        self, x: torch.Tensor, projections: tuple, norms: tuple, head_dim: int
    ) -> list[torch.Tensor]:
        """``[B, S, H, D]`` queries, keys and values, the queries and keys normalised."""
        out = [proj(x).unflatten(2, (-1, head_dim)) for proj in projections]
        for i, norm in enumerate(norms):
            if norm is not None:
                out[i] = shared_over(norm, out[i], self.tp)
        return out

    def rotate(self, q: torch.Tensor, k: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, ...]:
        """The video queries and keys rotated by the rope's ``(cos, sin)`` ``[S, D]``."""
        cos, sin = (t[:, None] for t in rope)  # [S, 1, D]
        return rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)

    def text_mask(self, mask: torch.Tensor, text_len: int) -> torch.Tensor:
        """Which text tokens are real ``[B, text]``, from the mask HunyuanVideo passes:
        ``[B, 1, 1, video + text]``, the text last."""
        return mask[:, 0, 0, -text_len:].bool()

    def padded_text(self, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        """The attention output of the text queries: padded ones attend like the rest."""
        return text

    def attend(self, attn: nn.Module, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = attn.inner_dim // attn.heads
        x, text = call.hidden_states, call.encoder_hidden_states
        own = (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)
        q, k, v = self._project(x, *own, head_dim)
        if call.rotary_emb is not None:
            q, k = self.rotate(q, k, call.rotary_emb)
        if attn.add_q_proj is not None:  # dual-stream: the text's own projections
            projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            text_qkv = self._project(
                text, projections, (attn.norm_added_q, attn.norm_added_k), head_dim
            )
        else:
            text_qkv = self._project(text, *own, head_dim)
        mask = call.attention_mask
        text_mask = None if mask is None else self.text_mask(mask, text.shape[1])
        video, text = self.joint_attention((q, k, v), tuple(text_qkv), text_mask)
        text = self.padded_text(text, text_mask)
        video, text = video.flatten(2, 3).to(q.dtype), text.flatten(2, 3).to(q.dtype)
        if getattr(attn, "to_out", None) is None:  # single-stream: its proj_out is whole
            return self.gather_heads(video), self.gather_heads(text)
        to_add_out = getattr(attn, "to_add_out", None)  # none where the text ends
        return attn.to_out[1](attn.to_out[0](video)), text if to_add_out is None else to_add_out(
            text
        )


_DUAL = r"transformer_blocks\.\d+"
_dual = split_layers(
    _DUAL + r"\.attn", _DUAL + r"\.ff", "to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj"
)
#: ``HunyuanVideoTransformer3DModel`` (diffusers declares no ``_cp_plan``).
HUNYUAN_VIDEO_PLAN = ModelPlan(
    blocks=("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"),
    attention=r"(single_)?transformer_blocks\.\d+\.attn",
    processor=HunyuanVideoAttnProcessor,
    column=(
        *_dual["column"],
        _DUAL + r"\.ff_context\.net\.0\.proj",
        r"single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)",
    ),
    row=(*_dual["row"], _DUAL + r"\.attn\.to_add_out", _DUAL + r"\.ff_context\.net\.2"),
    tokens={
        "rope": {None: Split(0, 2, output=True)},
        "x_embedder": {None: Split(1, 3, output=True)},
        "proj_out": Gather(1),
    },
    flow=FlowForward(extra=hunyuan_video_inputs, text_dim="text_embed_dim"),
)


class HunyuanVideo15AttnProcessor(HunyuanVideoAttnProcessor):
    """HunyuanVideo 1.5's joint attention: its dual-stream blocks take the text mask
    ``[B, text]`` (real tokens first), and a padded text token neither is attended nor
    attends (its output is zero)."""

    def text_mask(self, mask: torch.Tensor, text_len: int) -> torch.Tensor:
        return mask.bool()

    def padded_text(self, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        if text_mask is None:
            return text
        return text * text_mask[..., None, None]


#: ``HunyuanVideo15Transformer3DModel``: HunyuanVideo's dual-stream layers and tokens.
HUNYUAN_VIDEO_15_PLAN = replace(
    HUNYUAN_VIDEO_PLAN,
    blocks=("HunyuanVideo15TransformerBlock",),
    processor=HunyuanVideo15AttnProcessor,
    flow=FlowForward(
        conditioned=True,
        extra=hunyuan_video_15_inputs,
        text_dim="text_embed_dim",
        timestep_in_latents_dtype=True,
    ),
)
