"""diffusers' ``WanTransformer3DModel`` (Wan2.1 / Wan2.2, T2V and I2V) on a vidpar layout.

In place, the adapter:

* sets a :class:`WanAttnProcessor` on every block's ``attn1`` (self-attention through
  :class:`~vidpar.nn.attention.DistributedAttention`: Ulysses, Ring or USP) and ``attn2``
  (cross-attention to the text, and in I2V to the image tokens, both replicated on every
  sp rank: each rank attends its own queries, no communication);
* under tp > 1 splits the heads and the FFN: ``to_q/to_k/to_v`` (and I2V's
  ``add_k_proj/add_v_proj``) and ``ffn.net.0.proj`` column-parallel, ``to_out.0`` and
  ``ffn.net.2`` row-parallel, and ``norm_q``/``norm_k``/``norm_added_k`` (RMSNorm across
  all heads) :class:`~vidpar.models.tensor_parallel.HeadShardedRMSNorm`;
* hooks four module boundaries, leaving diffusers' forward untouched: ``rope``'s output
  becomes this rank's :class:`~vidpar.models.sequence.TokenShard`, ``patch_embedding``'s
  output this rank's tokens (as ``[B, C, S_local, 1, 1]``, which the forward flattens as
  usual), per-token timestep embeddings (Wan2.2 TI2V) are sharded with the tokens, and
  ``proj_out``'s output is gathered (the smallest tensor at that boundary).

Everything else (embeddings, modulation tables, norms, ``proj_out``) stays replicated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidpar.distributed.communication_op import gather_sequence
from vidpar.models.layout import Layout
from vidpar.models.sequence import TokenShard
from vidpar.models.tensor_parallel import (
    HeadShardedRMSNorm,
    column_parallel,
    replace_module,
    row_parallel,
)
from vidpar.nn.attention import DistributedAttention
from vidpar.nn.dit import shard_tokens
from vidpar.nn.linear import GroupRef

__all__ = ["WanAttnProcessor", "parallelize_wan"]

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


class WanAttnProcessor:
    """Wan attention on a layout: self-attention (``encoder_hidden_states is None``)
    through ``attention`` over the sp-sharded tokens, cross-attention locally. Heads are
    this rank's tp share (the projections' output width tells how many)."""

    def __init__(self, attention: DistributedAttention) -> None:
        self.attention = attention

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: TokenShard | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("vidpar's Wan attention takes no attention_mask (Wan passes none)")
        head_dim = attn.inner_dim // attn.heads
        if encoder_hidden_states is None:
            out = self._self_attention(attn, hidden_states, rotary_emb, head_dim)
        else:
            out = self._cross_attention(attn, hidden_states, encoder_hidden_states, head_dim)
        return attn.to_out[1](attn.to_out[0](out))

    def _self_attention(
        self, attn: nn.Module, x: torch.Tensor, shard: TokenShard | None, head_dim: int
    ) -> torch.Tensor:
        if not isinstance(shard, TokenShard):
            raise TypeError(
                "a parallelised Wan self-attention needs the TokenShard that the model's rope "
                "hook makes: call the whole model, not a block on its own"
            )
        q = attn.norm_q(attn.to_q(x)).unflatten(2, (-1, head_dim))
        k = attn.norm_k(attn.to_k(x)).unflatten(2, (-1, head_dim))
        v = attn.to_v(x).unflatten(2, (-1, head_dim))
        if shard.rope is not None:
            q, k = _rotate(q, *shard.rope), _rotate(k, *shard.rope)
        return self.attention(q, k, v, seq_len=shard.seq_len).flatten(2, 3).type_as(q)

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


class _WanTokens:
    """The forward hooks that shard the tokens once and gather them once."""

    def __init__(self, layout: Layout) -> None:
        self._sp = GroupRef(layout.sp)
        self.seq_len = 0  # of the forward in flight: set by the rope, read by proj_out

    def rope(self, module: nn.Module, args, output) -> TokenShard:
        if not (isinstance(output, tuple) and len(output) == 2):
            raise TypeError(
                "this diffusers' WanRotaryPosEmbed does not return (cos, sin); "
                "vidpar.models needs a diffusers release whose Wan rope does (0.35 or newer)"
            )
        cos, sin = output  # [1, S, 1, D], channel pairs repeated
        self.seq_len = cos.shape[1]
        sp = self._sp.group
        cos, sin = cos[..., 0::2], sin[..., 1::2]
        return TokenShard((shard_tokens(cos, sp, 1), shard_tokens(sin, sp, 1)), self.seq_len)

    def patch_embedding(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        tokens = shard_tokens(output.flatten(2), self._sp.group, dim=2)  # [B, C, S_local]
        return tokens[..., None, None]

    def condition_embedder(self, module: nn.Module, args, output):
        temb, timestep_proj, *rest = output
        if temb.ndim == 2:  # one timestep per sample
            return output
        sp = self._sp.group  # Wan2.2 TI2V: a timestep per token, sharded like the tokens
        return (shard_tokens(temb, sp, 1), shard_tokens(timestep_proj, sp, 1), *rest)

    def proj_out(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return gather_sequence(output, self._sp.group, self.seq_len, dim=1)


def _split_heads(model: nn.Module, layout: Layout) -> None:
    """Heads and FFN over tp: this rank's shards of the model's own weights."""
    tp = layout.tp
    for i, block in enumerate(model.blocks):
        prefix = f"blocks.{i}"
        for name in ("attn1", "attn2"):
            attn = getattr(block, name)
            columns = ["to_q", "to_k", "to_v"]
            norms = ["norm_q", "norm_k"]
            if attn.add_k_proj is not None:
                columns += ["add_k_proj", "add_v_proj"]
                norms.append("norm_added_k")
            for proj in columns:
                path = f"{prefix}.{name}.{proj}"
                replace_module(model, path, column_parallel(getattr(attn, proj), tp, path))
            path = f"{prefix}.{name}.to_out.0"
            replace_module(model, path, row_parallel(attn.to_out[0], tp, path))
            for norm in norms:
                replace_module(attn, norm, HeadShardedRMSNorm(getattr(attn, norm), tp))
        path = f"{prefix}.ffn.net.0.proj"
        replace_module(model, path, column_parallel(block.ffn.net[0].proj, tp, path))
        path = f"{prefix}.ffn.net.2"
        replace_module(model, path, row_parallel(block.ffn.net[2], tp, path))


def parallelize_wan(model: nn.Module, layout: Layout) -> None:
    """Prepare a ``WanTransformer3DModel`` for ``layout`` in place (see the module doc)."""
    heads = model.config.num_attention_heads
    if layout.tp.world_size > 1:
        _split_heads(model, layout)
    attention = DistributedAttention(heads, ulysses_group=layout.ulysses, ring_group=layout.ring)
    processor = WanAttnProcessor(attention)
    for block in model.blocks:
        block.attn1.set_processor(processor)
        block.attn2.set_processor(processor)
    tokens = _WanTokens(layout)
    model.rope.register_forward_hook(tokens.rope)
    model.patch_embedding.register_forward_hook(tokens.patch_embedding)
    model.condition_embedder.register_forward_hook(tokens.condition_embedder)
    model.proj_out.register_forward_hook(tokens.proj_out)
