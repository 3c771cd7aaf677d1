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

from vidpar.distributed.state import ParallelState
from vidpar.models.plan import ModelPlan, SequenceLength
from vidpar.nn.attention import DistributedAttention
from vidpar.nn.linear import GroupRef

__all__ = ["LTX_PLAN", "LTXAttnProcessor"]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """LTX's rotary embedding on ``x`` ``[B, S, C]`` (interleaved pairs, in float32 or
    wider, as diffusers)."""
    real, imag = x.unflatten(2, (-1, 2)).unbind(-1)
    rotated = torch.stack((-imag, real), -1).flatten(2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class LTXAttnProcessor:
    """LTX attention on a layout (see the module doc); heads are this rank's tp share."""

    def __init__(
        self, attention: DistributedAttention, state: ParallelState, length: SequenceLength
    ) -> None:
        self.attention = attention
        self.length = length
        self._tp = GroupRef(state.group("tp"))

    def _features(self, table: torch.Tensor, width: int) -> torch.Tensor:
        """This tp rank's ``width`` features of a rope table over all heads."""
        return table.narrow(-1, self._tp.group.rank_in_group * width, width)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        self_attention = encoder_hidden_states is None
        context = hidden_states if self_attention else encoder_hidden_states
        q = attn.norm_q(attn.to_q(hidden_states))
        k = attn.norm_k(attn.to_k(context))
        v = attn.to_v(context)
        if image_rotary_emb is not None:
            cos, sin = (self._features(t, q.shape[-1]) for t in image_rotary_emb)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k, v = (t.unflatten(2, (-1, attn.head_dim)) for t in (q, k, v))
        if self_attention:
            if attention_mask is not None:
                raise ValueError("vidpar's LTX self-attention takes no attention_mask")
            out = self.attention(q, k, v, seq_len=self.length.get())
        else:
            if attention_mask is not None and attention_mask.ndim == 3:  # [B, 1, L] bias
                attention_mask = attention_mask[:, None].to(q.dtype)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attention_mask
            ).transpose(1, 2)
        out = out.flatten(2, 3).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


_ATTENTION = r"transformer_blocks\.\d+\.attn[12]"
#: ``LTXVideoTransformer3DModel``: tokens from diffusers' ``_cp_plan``.
LTX_PLAN = ModelPlan(
    blocks=("LTXVideoTransformerBlock",),
    attention=_ATTENTION,
    processor=LTXAttnProcessor,
    column=(_ATTENTION + r"\.(to_q|to_k|to_v)", r"transformer_blocks\.\d+\.ff\.net\.0\.proj"),
    row=(_ATTENTION + r"\.to_out\.0", r"transformer_blocks\.\d+\.ff\.net\.2"),
    head_norms=(_ATTENTION + r"\.(norm_q|norm_k)",),
)
