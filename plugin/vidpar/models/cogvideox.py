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

from vidpar.distributed.state import ParallelState
from vidpar.models.plan import Gather, ModelPlan, SequenceLength, Split
from vidpar.models.sequence import replicated_query_attention
from vidpar.models.tensor_parallel import layer_norm_shared
from vidpar.nn.attention import DistributedAttention
from vidpar.nn.linear import GroupRef

__all__ = ["COGVIDEOX_PLAN", "CogVideoXAttnProcessor"]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb`` (real, interleaved pairs) on ``[B, S, H, D]`` with
    ``cos``/``sin`` ``[S, D]``, its float32 computation included."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-imag, real), -1).flatten(-2)
    cos, sin = cos[:, None], sin[:, None]
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class CogVideoXAttnProcessor:
    """CogVideoX's joint attention on a layout (see the module doc); heads are this rank's
    tp share."""

    def __init__(
        self, attention: DistributedAttention, state: ParallelState, length: SequenceLength
    ) -> None:
        self.attention = attention
        self.length = length
        self._tp = GroupRef(state.group("tp"))
        self._sp = GroupRef(state.group("sp"))

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("vidpar's CogVideoX attention takes no attention_mask")
        seq_len = self.length.get()
        text_len = encoder_hidden_states.shape[1]
        x = torch.cat((encoder_hidden_states, hidden_states), 1)
        head_dim = attn.inner_dim // attn.heads
        q, k, v = (
            proj(x).unflatten(2, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        tp = self._tp.group
        if attn.norm_q is not None:
            q = layer_norm_shared(q, attn.norm_q, tp)
        if attn.norm_k is not None:
            k = layer_norm_shared(k, attn.norm_k, tp)
        (q_text, q_video), (k_text, k_video), (v_text, v_video) = (
            (t[:, :text_len], t[:, text_len:]) for t in (q, k, v)
        )
        if image_rotary_emb is not None:
            q_video = _rotate(q_video, *image_rotary_emb)
            k_video = _rotate(k_video, *image_rotary_emb)
        video = self.attention(
            q_video, k_video, v_video, seq_len=seq_len, joint_k=k_text, joint_v=v_text
        )
        text = replicated_query_attention(
            q_text, k_video, v_video, self._sp.group, seq_len, k_text, v_text
        )
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
    column=(_ATTENTION + r"\.(to_q|to_k|to_v)", r"transformer_blocks\.\d+\.ff\.net\.0\.proj"),
    row=(_ATTENTION + r"\.to_out\.0", r"transformer_blocks\.\d+\.ff\.net\.2"),
    tokens={
        "": {"image_rotary_emb": Split(0, 2)},
        "transformer_blocks.0": {"hidden_states": Split(1, 3)},
        "proj_out": Gather(1),
    },
)
