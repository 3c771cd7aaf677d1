"""diffusers' ``MochiTransformer3DModel`` (Mochi 1) on a vidpar layout: its plan and its
processor.

Mochi attends video and text jointly with separate, asymmetric projections (the text is
narrower than the video; ``add_*_proj`` and ``to_add_out`` map between them), like
HunyuanVideo 1.5's dual-stream blocks: the text mask ``[B, text]`` (real tokens first)
leaves padded text tokens out as keys and zeroes their outputs. Its rotary embedding is a
``(cos, sin)`` pair per token and head ``[S, heads, head_dim / 2]`` computed from learned
frequencies, narrowed to this rank's heads under tp. Under tp the attention heads are split; the SwiGLU feed-forwards,
whose first linear holds the value and the gate side by side, stay replicated.
"""

from __future__ import annotations

import torch

from vidpar.models.flow_forward import FlowForward, text_mask
from vidpar.models.hunyuan_video import HunyuanVideo15AttnProcessor
from vidpar.models.plan import Gather, ModelPlan, Split
from vidpar.models.tensor_parallel import replicated_over

__all__ = ["MOCHI_PLAN", "MochiAttnProcessor"]


class MochiAttnProcessor(HunyuanVideo15AttnProcessor):
    """Mochi's joint attention on a layout (see the module doc)."""

    def rotate(self, q: torch.Tensor, k: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, ...]:
        """This rank's heads of the tables (learned: their gradients summed over tp)."""
        heads, start = q.shape[2], self.first_head()
        cos, sin = (replicated_over(t, self.tp).narrow(1, start, heads) for t in rope)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Mochi's rotary embedding of ``x`` ``[B, S, H, D]`` by ``[S, H, D / 2]`` tables, in
    float32, as diffusers computes it."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    rotated = (even * cos - odd * sin, even * sin + odd * cos)
    return torch.stack([r.to(x.dtype) for r in rotated], -1).flatten(-2)


_ATTENTION = r"transformer_blocks\.\d+\.attn1"
#: ``MochiTransformer3DModel`` (diffusers declares no ``_cp_plan``).
MOCHI_PLAN = ModelPlan(
    blocks=("MochiTransformerBlock",),
    attention=_ATTENTION,
    processor=MochiAttnProcessor,
    column=(_ATTENTION + r"\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)",),
    row=(_ATTENTION + r"\.(to_out\.0|to_add_out)",),
    tokens={
        "rope": {None: Split(0, 3, output=True)},
        "transformer_blocks.0": {"hidden_states": Split(1, 3)},
        "proj_out": Gather(1),
    },
    # Mochi's scheduler inverts the sigmas: timestep 1000 (1 - t), output x0 - noise.
    flow=FlowForward(inverted=True, extra=text_mask, text_dim="text_embed_dim"),
)
