"""diffusers' ``CogVideoXTransformer3DModel`` (CogVideoX 1.0 / 1.5) on a vidpar layout:
its plan and its joint-attention processor.

CogVideoX attends jointly: every block concatenates the text tokens and the video tokens
and runs one self-attention over both, so the text tokens are queries too. Under sp the
video tokens are sharded and the text tokens are replicated on every rank (as in Wan's
cross-attention), and each rank computes, exactly:

* its **video queries** over all video keys plus the text keys:
  :class:`~vidpar.nn.attention.DistributedAttention` with the text as ``joint_k/joint_v``
  (Ulysses, Ring or USP);
* the **text queries** over the text keys plus all video keys:
  :func:`~vidpar.models.sequence.replicated_query_attention`: each rank attends the text
  queries to its own video keys, the partial outputs and log-sum-exps are all-gathered
  over sp (``text × heads × (head_dim + 1)`` numbers per rank: the text is short) and
  merged with the text-to-text block by their softmax weights. The merge is the softmax
  itself, split by keys, so the result is exact; every rank ends with the same text.

Under tp the heads and the FFN are split (``to_q/to_k/to_v`` and ``ff.net.0.proj``
column-parallel, ``to_out.0`` and ``ff.net.2`` row-parallel). CogVideoX's ``norm_q`` and
``norm_k`` are LayerNorms over ``head_dim`` that all heads share: they stay replicated
and their gradients are summed over tp. The plan (:data:`COGVIDEOX_PLAN`) splits the
rotary embedding the caller gives and the first block's video tokens, and gathers
``proj_out``'s output; diffusers' forward is untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from vidpar.models.plan import AttentionCall, Gather, ModelPlan, PlanProcessor, Split, split_layers
from vidpar.models.sequence import rotate_pairs
from vidpar.models.tensor_parallel import layer_norm_shared

__all__ = ["COGVIDEOX_PLAN", "CogVideoXAttnProcessor"]


class CogVideoXAttnProcessor(PlanProcessor):
    """CogVideoX's joint attention on a layout (see the module doc)."""

    def attend(self, attn: nn.Module, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        if call.attention_mask is not None:
            raise ValueError("vidpar's CogVideoX attention takes no attention_mask")
        text_len = call.encoder_hidden_states.shape[1]
        x = torch.cat((call.encoder_hidden_states, call.hidden_states), 1)
        head_dim = attn.inner_dim // attn.heads
        q, k, v = (
            proj(x).unflatten(2, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            q = layer_norm_shared(q, attn.norm_q, self.tp)
        if attn.norm_k is not None:
            k = layer_norm_shared(k, attn.norm_k, self.tp)
        (q_text, q_video), (k_text, k_video), (v_text, v_video) = (
            (t[:, :text_len], t[:, text_len:]) for t in (q, k, v)
        )
        if call.rotary_emb is not None:
            cos, sin = (t[:, None] for t in call.rotary_emb)  # [S, 1, D]
            q_video, k_video = rotate_pairs(q_video, cos, sin), rotate_pairs(k_video, cos, sin)
        video, text = self.joint_attention((q_video, k_video, v_video), (q_text, k_text, v_text))
        out = torch.cat((text, video), 1).flatten(2, 3)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, text_len:], out[:, :text_len]


_ATTENTION = r"transformer_blocks\.\d+\.attn1"
#: ``CogVideoXTransformer3DModel`` (diffusers declares no ``_cp_plan``): the video tokens
#: are split at the first block's input (after the patch embedding has split off the
#: text), the rotary embedding ``[S, D]`` as the model receives it.
COGVIDEOX_PLAN = ModelPlan(
    blocks=("CogVideoXBlock",),
    attention=_ATTENTION,
    processor=CogVideoXAttnProcessor,
    **split_layers(_ATTENTION, r"transformer_blocks\.\d+\.ff"),
    tokens={
        "": {"image_rotary_emb": Split(0, 2)},
        "transformer_blocks.0": {"hidden_states": Split(1, 3)},
        "proj_out": Gather(1),
    },
    flow="CogVideoX is a v-prediction DDPM model (CogVideoXDDIMScheduler), not a flow-matching "
    "one: DiffusersFlowModule's rectified-flow objective would retrain it to another "
    "parameterisation",
)
