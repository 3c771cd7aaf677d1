"""diffusers' ``CogVideoXTransformer3DModel`` (CogVideoX 1.0 / 1.5) on a vidpar layout.

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
and their gradients are summed over tp. The adapter hooks the model's inputs (the
rotary embedding, given by the caller, becomes this rank's
:class:`~vidpar.models.sequence.TokenShard`), ``patch_embed``'s output (the video part
is sharded) and ``proj_out``'s output (gathered); diffusers' forward is untouched.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from vidpar.distributed.communication_op import gather_sequence
from vidpar.models.layout import Layout
from vidpar.models.sequence import TokenShard, replicated_query_attention
from vidpar.models.tensor_parallel import (
    column_parallel,
    layer_norm_shared,
    replace_module,
    row_parallel,
)
from vidpar.nn.attention import DistributedAttention
from vidpar.nn.dit import shard_tokens
from vidpar.nn.linear import GroupRef

__all__ = ["CogVideoXAttnProcessor", "parallelize_cogvideox"]


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

    def __init__(self, attention: DistributedAttention, layout: Layout) -> None:
        self.attention = attention
        self._tp = GroupRef(layout.tp)
        self._sp = GroupRef(layout.sp)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: TokenShard | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("vidpar's CogVideoX attention takes no attention_mask")
        shard = image_rotary_emb
        if not isinstance(shard, TokenShard):
            raise TypeError(
                "a parallelised CogVideoX attention needs the TokenShard that the model's "
                "input hook makes: call the whole model, not a block on its own"
            )
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
        if shard.rope is not None:
            q_video, k_video = _rotate(q_video, *shard.rope), _rotate(k_video, *shard.rope)
        video = self.attention(
            q_video, k_video, v_video, seq_len=shard.seq_len, joint_k=k_text, joint_v=v_text
        )
        text = replicated_query_attention(
            q_text, k_video, v_video, self._sp.group, shard.seq_len, k_text, v_text
        )
        out = torch.cat((text, video), 1).flatten(2, 3)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, text_len:], out[:, :text_len]


class _CogVideoXTokens:
    """The hooks that shard the tokens once and gather them once."""

    def __init__(self, model: nn.Module, layout: Layout) -> None:
        self._sp = GroupRef(layout.sp)
        self._signature = inspect.signature(model.forward)
        self.patch_size = model.config.patch_size
        self.patch_size_t = model.config.patch_size_t
        self.seq_len = 0  # of the forward in flight

    def inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The rotary embedding argument becomes this rank's TokenShard."""
        bound = self._signature.bind(*args, **kwargs)
        frames, _, height, width = bound.arguments["hidden_states"].shape[1:]
        frames = frames // self.patch_size_t if self.patch_size_t else frames
        self.seq_len = frames * (height // self.patch_size) * (width // self.patch_size)
        rope = bound.arguments.get("image_rotary_emb")
        if rope is not None:
            sp = self._sp.group
            rope = tuple(shard_tokens(t, sp, 0) for t in rope)  # [S, D] each
        bound.arguments["image_rotary_emb"] = TokenShard(rope, self.seq_len)
        return bound.args, bound.kwargs

    def patch_embed(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        text_len = args[0].shape[1]  # [text; video] embeddings: shard the video part
        if output.shape[1] - text_len != self.seq_len:
            raise ValueError(
                f"the patch embedding made {output.shape[1] - text_len} video tokens, "
                f"expected {self.seq_len} from the input's shape"
            )
        video = shard_tokens(output[:, text_len:], self._sp.group, 1)
        return torch.cat((output[:, :text_len], video), 1)

    def proj_out(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return gather_sequence(output, self._sp.group, self.seq_len, dim=1)


def _split_heads(model: nn.Module, layout: Layout) -> None:
    """Heads and FFN over tp: this rank's shards of the model's own weights."""
    tp = layout.tp
    for i, block in enumerate(model.transformer_blocks):
        prefix = f"transformer_blocks.{i}"
        for proj in ("to_q", "to_k", "to_v"):
            path = f"{prefix}.attn1.{proj}"
            replace_module(model, path, column_parallel(getattr(block.attn1, proj), tp, path))
        path = f"{prefix}.attn1.to_out.0"
        replace_module(model, path, row_parallel(block.attn1.to_out[0], tp, path))
        path = f"{prefix}.ff.net.0.proj"
        replace_module(model, path, column_parallel(block.ff.net[0].proj, tp, path))
        path = f"{prefix}.ff.net.2"
        replace_module(model, path, row_parallel(block.ff.net[2], tp, path))


def parallelize_cogvideox(model: nn.Module, layout: Layout) -> None:
    """Prepare a ``CogVideoXTransformer3DModel`` for ``layout`` in place (module doc)."""
    heads = model.config.num_attention_heads
    if layout.tp.world_size > 1:
        _split_heads(model, layout)
    attention = DistributedAttention(heads, ulysses_group=layout.ulysses, ring_group=layout.ring)
    processor = CogVideoXAttnProcessor(attention, layout)
    for block in model.transformer_blocks:
        block.attn1.set_processor(processor)
    tokens = _CogVideoXTokens(model, layout)
    model.register_forward_pre_hook(tokens.inputs, with_kwargs=True)
    model.patch_embed.register_forward_hook(tokens.patch_embed)
    model.proj_out.register_forward_hook(tokens.proj_out)
