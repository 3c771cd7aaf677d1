"""diffusers' Wan family on a vidpar layout, as plans: ``WanTransformer3DModel`` (Wan2.1 /
Wan2.2, T2V, I2V and TI2V) and ``SkyReelsV2Transformer3DModel`` (the same blocks).

* Attention: :class:`WanAttnProcessor` on every block's ``attn1`` (self-attention through
  :class:`~vidpar.nn.attention.DistributedAttention`: Ulysses, Ring or USP) and ``attn2``
  (cross-attention to the text, and in I2V to the image tokens, both replicated on every
  sp rank: each rank attends its own queries, no communication).
* Tensor parallel: ``to_q/to_k/to_v`` (and I2V's ``add_k_proj/add_v_proj``) and
  ``ffn.net.0.proj`` column-parallel, ``to_out.0`` and ``ffn.net.2`` row-parallel,
  ``norm_q``/``norm_k``/``norm_added_k`` (RMSNorm across all heads) head-sharded.
* Tokens: Wan's diffusers ``_cp_plan`` (the rope's output, the first block's input, a
  per-token timestep, ``proj_out`` gathered); SkyReels-V2, which has none, states the same
  without the per-token timestep (its per-frame diffusion-forcing timesteps are not split).

Everything else (embeddings, modulation tables, norms, ``proj_out``) stays replicated.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from vidpar.models.plan import AttentionCall, Gather, ModelPlan, PlanProcessor, Split, split_layers

__all__ = ["SKYREELS_V2_PLAN", "WAN_PLAN", "WanAttnProcessor"]

#: Text tokens Wan's I2V cross-attention expects after the image tokens (as diffusers).
_TEXT_TOKENS = 512


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` ``[B, S, H, D]`` by ``cos``/``sin`` ``[1, S, 1, D/2]``
    (diffusers' Wan rotary embedding, its dtype promotions included)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2).type_as(x)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Local attention on ``[B, S, H, D]`` tensors."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class WanAttnProcessor(PlanProcessor):
    """Wan attention on a layout: self-attention (``encoder_hidden_states is None``)
    through the distributed attention over the sp-sharded tokens, cross-attention
    locally."""

    def attend(self, attn: nn.Module, call: AttentionCall) -> torch.Tensor:
        if call.attention_mask is not None:
            raise ValueError(
                "vidpar's Wan attention takes no attention_mask (SkyReels-V2's diffusion "
                "forcing causal mask is not supported yet)"
            )
        head_dim = attn.inner_dim // attn.heads
        x, context = call.hidden_states, call.encoder_hidden_states
        if context is None:
            out = self._self_attention(attn, x, call.rotary_emb, head_dim)
        else:
            out = self._cross_attention(attn, x, context, head_dim)
        return attn.to_out[1](attn.to_out[0](out))

    def _self_attention(
        self, attn: nn.Module, x: torch.Tensor, rope: tuple | None, head_dim: int
    ) -> torch.Tensor:
        q = attn.norm_q(attn.to_q(x)).unflatten(2, (-1, head_dim))
        k = attn.norm_k(attn.to_k(x)).unflatten(2, (-1, head_dim))
        v = attn.to_v(x).unflatten(2, (-1, head_dim))
        if rope is not None:
            cos, sin = rope[0][..., 0::2], rope[1][..., 1::2]  # channel pairs repeated
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        return self.attention(q, k, v, seq_len=self.length.get()).flatten(2, 3).type_as(q)

    def _cross_attention(
        self, attn: nn.Module, x: torch.Tensor, context: torch.Tensor, head_dim: int
    ) -> torch.Tensor:
        image = None
        if attn.add_k_proj is not None:  # I2V: image tokens first, then the text
            image, context = context[:, :-_TEXT_TOKENS], context[:, -_TEXT_TOKENS:]
        q = attn.norm_q(attn.to_q(x)).unflatten(2, (-1, head_dim))
        k = attn.norm_k(attn.to_k(context)).unflatten(2, (-1, head_dim))
        v = attn.to_v(context).unflatten(2, (-1, head_dim))
        out = _sdpa(q, k, v).flatten(2, 3).type_as(q)
        if image is not None:
            k_img = attn.norm_added_k(attn.add_k_proj(image)).unflatten(2, (-1, head_dim))
            v_img = attn.add_v_proj(image).unflatten(2, (-1, head_dim))
            out = out + _sdpa(q, k_img, v_img).flatten(2, 3).type_as(q)
        return out


_ATTENTION = r"blocks\.\d+\.attn[12]"
#: ``WanTransformer3DModel``: tokens from diffusers' ``_cp_plan``.
WAN_PLAN = ModelPlan(
    blocks=("WanTransformerBlock",),
    attention=_ATTENTION,
    processor=WanAttnProcessor,
    **split_layers(
        _ATTENTION,
        r"blocks\.\d+\.ffn",
        projections="to_q|to_k|to_v|add_k_proj|add_v_proj",
        norms="norm_q|norm_k|norm_added_k",
    ),
)
#: ``SkyReelsV2Transformer3DModel``: Wan's layers; diffusers declares no ``_cp_plan``.
SKYREELS_V2_PLAN = replace(
    WAN_PLAN,
    blocks=("SkyReelsV2TransformerBlock",),
    tokens={
        "rope": {0: Split(1, 4, output=True), 1: Split(1, 4, output=True)},
        "blocks.0": {"hidden_states": Split(1, 3)},
        "proj_out": Gather(1),
    },
)
