"""diffusers' ``LTXVideoTransformer3DModel`` (LTX-Video) on a vidpar layout: its plan and
its attention processor.

The tokens split and gather where LTX's diffusers ``_cp_plan`` says (the model's input
tokens, the rope's ``(cos, sin)``, ``proj_out``), except the text and its mask, which stay
whole on every sp rank: the cross-attention (``attn2``) attends this rank's queries to the
whole text locally, the self-attention (``attn1``) runs through
:class:`~vidpar.nn.attention.DistributedAttention`. Under tp the heads and the FFN are
split like Wan's (``norm_q``/``norm_k`` are RMSNorms across all heads), and the rotary
embedding, which LTX applies over the whole feature dim, is narrowed to this rank's heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidpar.models.flow_forward import FlowForward, text_mask
from vidpar.models.plan import AttentionCall, ModelPlan, PlanProcessor, split_layers
from vidpar.models.sequence import rotate_pairs

__all__ = ["LTX_PLAN", "LTXAttnProcessor"]


class LTXAttnProcessor(PlanProcessor):
    """LTX attention on a layout (see the module doc)."""

    def attend(self, attn: nn.Module, call: AttentionCall) -> torch.Tensor:
        x, context = call.hidden_states, call.encoder_hidden_states
        self_attention = context is None
        context = x if self_attention else context
        q = attn.norm_q(attn.to_q(x))
        k = attn.norm_k(attn.to_k(context))
        v = attn.to_v(context)
        if call.rotary_emb is not None:  # over all heads' features: narrowed to this rank's
            width, start = q.shape[-1], self.first_head() * attn.head_dim
            cos, sin = (t.narrow(-1, start, width) for t in call.rotary_emb)
            q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        q, k, v = (t.unflatten(2, (-1, attn.head_dim)) for t in (q, k, v))
        mask = call.attention_mask
        if self_attention:
            if mask is not None:
                raise ValueError("vidpar's LTX self-attention takes no attention_mask")
            out = self.attention(q, k, v, seq_len=self.length.get())
        else:
            if mask is not None and mask.ndim == 3:  # LTX's text bias [B, 1, L]
                mask = mask[:, None].to(q.dtype)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
            ).transpose(1, 2)
        out = out.flatten(2, 3).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


_ATTENTION = r"transformer_blocks\.\d+\.attn[12]"
#: ``LTXVideoTransformer3DModel``: tokens from diffusers' ``_cp_plan``.
LTX_PLAN = ModelPlan(
    blocks=("LTXVideoTransformerBlock",),
    attention=_ATTENTION,
    processor=LTXAttnProcessor,
    **split_layers(_ATTENTION, r"transformer_blocks\.\d+\.ff", norms="norm_q|norm_k"),
    # Latents as tokens, a full text mask, the rope scale LTXPipeline passes (its VAE's
    # compression 8 in time over 25 frames per second, 32 in space).
    flow=FlowForward(
        tokens=True,
        extra=text_mask,
        constants={"rope_interpolation_scale": (8 / 25, 32, 32)},
        text_dim="caption_channels",
    ),
)
