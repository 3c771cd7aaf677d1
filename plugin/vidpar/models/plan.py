"""A model family as data: a :class:`ModelPlan`, and :func:`apply_plan`, the one function
that prepares a model for the current :class:`~vidpar.distributed.ParallelState` from it.

A plan says, by module paths and name patterns (regular expressions matched against the
whole dotted path):

* **tensor parallel**: which ``nn.Linear`` layers become column-parallel (output features
  split over tp) and row-parallel (input features split), and which RMSNorms normalise
  over all heads while the heads are split
  (:class:`~vidpar.models.tensor_parallel.HeadShardedRMSNorm`); all in whole heads, the
  first ranks one more where tp does not divide them;
* **tokens**: where the video tokens (and the rotary embedding, and any per-token
  conditioning) are split over sp and where the output is gathered, in diffusers'
  ``_cp_plan`` vocabulary (:mod:`vidpar.models.token_sharding`: ``Split``, ``Gather``,
  the hooks). A plan without ``tokens`` reads the model class's own diffusers
  ``_cp_plan``, leaving whole the entries it names in ``whole`` (the text: vidpar
  replicates the text tokens on every sp rank);
* **attention**: which attention modules get the family's processor (built once per model
  around a :class:`~vidpar.nn.attention.DistributedAttention`; processors stay per family
  where the attention really differs), or none: diffusers' own processors, whose
  context-parallel calls vidpar runs (:mod:`vidpar.models.diffusers_cp`, a class with only
  a ``_cp_plan``);
* **blocks**: the repeated block classes that regional compilation compiles;
* **flow**: the family's forward as a flow-matching velocity
  (:class:`~vidpar.models.flow_forward.FlowForward`, what ``DiffusersFlowModule`` trains
  through), or why it is not trained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from vidpar.config import ParallelConfig
from vidpar.distributed.group import GroupCoordinator
from vidpar.distributed.state import ParallelState
from vidpar.distributed.utils import split_sizes
from vidpar.models.diffusers_cp import (
    ContextParallelAttention,
    refuse_tp,
    route_context_parallel,
)
from vidpar.models.flow_forward import PLAIN_FORWARD, FlowForward
from vidpar.models.sequence import replicated_query_attention
from vidpar.models.tensor_parallel import (
    HeadShardedRMSNorm,
    column_parallel,
    gather_shards,
    replace_module,
    row_parallel,
)
from vidpar.models.token_sharding import (
    Gather,
    SequenceLength,
    Split,
    TokenHooks,
    TokenPlan,
    cp_plan_tokens,
)
from vidpar.nn.attention import DistributedAttention
from vidpar.nn.linear import GroupRef

__all__ = [
    "AttentionCall",
    "Gather",
    "ModelPlan",
    "PlanProcessor",
    "SequenceLength",
    "Split",
    "apply_plan",
    "check_heads",
    "split_layers",
]


#: Queries, keys and values ``[B, S, H, D]``.
QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class AttentionCall(NamedTuple):
    """What diffusers passes an attention processor besides the attention module."""

    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor | None
    attention_mask: torch.Tensor | None
    rotary_emb: Any


class PlanProcessor:
    """Base of the families' attention processors: one per model, around its
    :class:`~vidpar.nn.attention.DistributedAttention`, with the tp and sp groups and the
    :class:`SequenceLength` of the forward in flight. A family implements :meth:`attend`
    on this rank's tp share of the heads (the projections' width tells how many)."""

    def __init__(
        self, attention: DistributedAttention, state: ParallelState, length: SequenceLength
    ) -> None:
        self.attention = attention
        self.length = length
        self._tp = GroupRef(state.group("tp"))
        self._sp = GroupRef(state.group("sp"))

    @property
    def tp(self) -> GroupCoordinator:
        return self._tp.group

    @property
    def sp(self) -> GroupCoordinator:
        return self._sp.group

    def tp_heads(self) -> tuple[int, ...]:
        """Every tp rank's heads (whole heads, the first ranks one more)."""
        return split_sizes(self.attention.num_heads, self.tp.world_size)

    def first_head(self) -> int:
        """The index of this tp rank's first head among all the model's heads."""
        return sum(self.tp_heads()[: self.tp.rank_in_group])

    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        """All heads' features ``[..., heads × head_dim]`` from this rank's."""
        sizes = self.tp_heads()
        head_dim = x.shape[-1] // sizes[self.tp.rank_in_group]
        return gather_shards(x, self.tp, tuple(n * head_dim for n in sizes))

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        call = AttentionCall(hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return self.attend(attn, call)

    def attend(self, attn: nn.Module, call: AttentionCall) -> Any:
        raise NotImplementedError

    def joint_attention(
        self, video: QKV, text: QKV, text_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint attention of this rank's video tokens and the whole text (both queries
        and keys), ``[B, S, H, D]`` each: the video queries through the distributed
        attention with the text as joint keys, the text queries (held whole on every sp
        rank) by :func:`~vidpar.models.sequence.replicated_query_attention`. With
        ``text_mask`` (``[B, L]`` bool, real tokens first) only each sample's real text
        keys count (a padded prompt). Eager, a batch with padding runs one sample at a
        time over its real text only (shapes from the mask's values); under
        ``torch.compile`` the whole batch runs over the padded text with the padded keys'
        scores biased away (static shapes: no graph break). Returns ``(video, text)``."""
        if text_mask is not None and not torch.compiler.is_compiling():
            lengths = text_mask.sum(-1).tolist()
            if min(lengths) == text[1].shape[1]:
                return self.joint_attention(video, text)
            outs = [
                self.joint_attention(
                    tuple(t[b : b + 1] for t in video),
                    tuple(t[b : b + 1] if i == 0 else t[b : b + 1, :n] for i, t in enumerate(text)),
                )
                for b, n in enumerate(lengths)
            ]
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        seq_len = self.length.get()
        (q, k, v), (q_text, k_text, v_text) = video, text
        joint = {} if k_text.shape[1] == 0 else {"joint_k": k_text, "joint_v": v_text}
        if joint and text_mask is not None:
            joint["joint_mask"] = text_mask.bool()
        out = self.attention(q, k, v, seq_len=seq_len, **joint)
        extra = (k_text, v_text) if joint else (None, None)
        text_out = replicated_query_attention(
            q_text, k, v, self.sp, seq_len, *extra, extra_mask=joint.get("joint_mask")
        )
        return out, text_out


def split_layers(
    attention: str, ffn: str, projections: str = "to_q|to_k|to_v", norms: str | None = None
) -> dict[str, tuple[str, ...]]:
    """diffusers' usual tp split (``column``, ``row`` and ``head_norms`` of a
    :class:`ModelPlan`): the ``projections`` of the ``attention`` modules and the FFN's
    first linear column-parallel, the attention output and the FFN's last linear
    row-parallel, and the attention's RMSNorms across all heads ``norms`` head-sharded
    (path patterns)."""
    return {
        "column": (rf"{attention}\.({projections})", rf"{ffn}\.net\.0\.proj"),
        "row": (rf"{attention}\.to_out\.0", rf"{ffn}\.net\.2"),
        "head_norms": (rf"{attention}\.({norms})",) if norms else (),
    }


@dataclass(frozen=True)
class ModelPlan:
    """How one diffusers model family runs on a layout (see the module doc)."""

    #: The repeated transformer block classes (regional compilation).
    blocks: tuple[str, ...]
    #: Attention modules (a path pattern) that get ``processor``.
    attention: str
    #: The family's attention processor class; ``None``: the model's own diffusers
    #: processors, their context-parallel calls distributed (sp only, no tp).
    processor: type[PlanProcessor] | None
    column: tuple[str, ...] = ()
    row: tuple[str, ...] = ()
    head_norms: tuple[str, ...] = ()
    #: The token splits and gathers; ``None``: the model class's diffusers ``_cp_plan``.
    tokens: TokenPlan | None = None
    #: Inputs of diffusers' ``_cp_plan`` that stay whole (replicated text).
    whole: tuple[str, ...] = ("encoder_hidden_states", "encoder_attention_mask")
    #: The config entry holding the number of attention heads.
    heads: str = "num_attention_heads"
    #: Its forward as a flow-matching velocity (``DiffusersFlowModule`` trains it), or why
    #: it is not trained.
    flow: FlowForward | str = PLAIN_FORWARD


def check_heads(parallel: ParallelConfig, num_heads: int) -> None:
    """The one place a diffusers model's heads are checked against a layout (before launch,
    and where a plan meets the layout): every rank of ulysses × tp needs a head. Counts
    that tp or ulysses do not divide split in whole heads, the first ranks one more (a
    plan's tp layers as vidpar's own)."""
    parallel.check_heads(num_heads)


def apply_plan(model: nn.Module, plan: ModelPlan, state: ParallelState) -> None:
    """Prepare ``model`` for ``state`` in place, as ``plan`` says."""
    tp = state.group("tp")
    if plan.processor is None:
        refuse_tp(model, tp.world_size)
    elif tp.world_size > 1:
        _split_layers(model, plan, tp)
    length = SequenceLength()
    tokens = plan.tokens if plan.tokens is not None else cp_plan_tokens(model, plan.whole)
    if plan.processor is None:
        heads = getattr(model.config, plan.heads)
        route_context_parallel(model, ContextParallelAttention(heads, state, length))
        TokenHooks(model, tokens, state.group("sp"), length)
        return
    attention = DistributedAttention(
        getattr(model.config, plan.heads),
        ulysses_group=state.group("ulysses"),
        ring_group=state.group("ring"),
    )
    processor = plan.processor(attention, state, length)
    pattern = re.compile(plan.attention)
    for name, module in model.named_modules():
        if pattern.fullmatch(name):
            if hasattr(module, "set_processor"):
                module.set_processor(processor)
            else:  # an attention class of its own (Mochi's)
                module.processor = processor
    TokenHooks(model, tokens, state.group("sp"), length)


def _head_unit(features: int, heads: int) -> int:
    """The unit a layer's split side goes in: a head's width where the features are whole
    heads (attention; an FFN as wide as a multiple of the heads splits alike), else one."""
    return features // heads if features % heads == 0 else 1


def _split_layers(model: nn.Module, plan: ModelPlan, tp: GroupCoordinator) -> None:
    """This rank's tp shards of the layers the plan's patterns name: in whole heads (the
    first ranks one more where tp does not divide them), a column layer's output as its
    row partner's input."""
    heads = getattr(model.config, plan.heads)

    def column(m: nn.Module, path: str) -> nn.Module:
        return column_parallel(m, tp, path, _head_unit(m.out_features, heads))

    def row(m: nn.Module, path: str) -> nn.Module:
        return row_parallel(m, tp, path, _head_unit(m.in_features, heads))

    styles = [(re.compile(p), column) for p in plan.column]
    styles += [(re.compile(p), row) for p in plan.row]
    styles += [
        (re.compile(p), lambda m, path: HeadShardedRMSNorm(m, tp, heads)) for p in plan.head_norms
    ]
    split = 0
    for path, module in list(model.named_modules()):
        for pattern, shard in styles:
            if pattern.fullmatch(path):
                replace_module(model, path, shard(module, path))
                split += 1
                break
    if not split:
        raise ValueError(
            f"{type(model).__name__} runs sequence parallel only: its plan names no layers "
            f"to split over tp({tp.world_size}); set parallel.tp=1"
        )
