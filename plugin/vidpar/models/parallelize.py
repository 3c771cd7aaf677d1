"""``parallelize(model)``: a diffusers video transformer prepared for the current layout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from vidpar.distributed.state import get_parallel_state
from vidpar.models.cogvideox import parallelize_cogvideox
from vidpar.models.layout import Layout, _current_layout
from vidpar.models.wan import parallelize_wan
from vidpar.nn.regional_compile import CompileSetting, compile_options

__all__ = ["SUPPORTED_MODELS", "parallelize"]

ModelT = TypeVar("ModelT", bound=nn.Module)


@dataclass(frozen=True)
class _Family:
    adapt: Callable[[nn.Module, Layout], None]
    #: The repeated transformer block classes that regional compilation compiles.
    blocks: tuple[str, ...]


_FAMILIES: dict[str, _Family] = {
    "WanTransformer3DModel": _Family(parallelize_wan, ("WanTransformerBlock",)),
    "CogVideoXTransformer3DModel": _Family(parallelize_cogvideox, ("CogVideoXBlock",)),
}
#: The diffusers model classes :func:`parallelize` knows.
SUPPORTED_MODELS: tuple[str, ...] = tuple(_FAMILIES)


def _family(model: nn.Module) -> tuple[str, _Family]:
    """The known diffusers class ``model`` is (or derives from)."""
    for cls in type(model).__mro__:
        if cls.__name__ in _FAMILIES and cls.__module__.startswith("diffusers."):
            return cls.__name__, _FAMILIES[cls.__name__]
    raise TypeError(
        f"vidpar.models.parallelize does not know {type(model).__module__}."
        f"{type(model).__qualname__}; it knows these diffusers models: "
        f"{', '.join(SUPPORTED_MODELS)}"
    )


def _compile_blocks(model: nn.Module, blocks: tuple[str, ...], options: dict[str, Any]) -> None:
    """Regional compilation: every repeated block compiled with the same options, so each
    block class is traced once and its graph reused by every instance."""
    for module in model.modules():
        if type(module).__name__ in blocks:
            module.compile(**options)


def parallelize(model: ModelT, *, compile: CompileSetting = False) -> ModelT:
    """Prepare a diffusers video transformer for the current layout, in place; returns it.

    Inside a layout (:func:`vidpar.distributed.parallel_context`, a ``VidParStrategy``'s
    ``configure_model``, an Executor worker) the self-attention runs through
    :class:`~vidpar.nn.attention.DistributedAttention` (Ulysses, Ring, USP) with the tokens
    sharded over sp once after the patch embedding and gathered once at the output, and
    under tp the attention heads and the FFN are split into vidpar's column/row-parallel
    layers holding this rank's shards of the model's own weights, under their original
    names (``blocks.0.attn1.to_q.weight``; sharded ones carry ``tensor_parallel_dim``, so
    :func:`vidpar.distributed.full_weights.load_full_weights` and ``full_state_dict`` read and
    write diffusers checkpoints). The model keeps diffusers' forward signature and its
    output on every rank equals the unparallelised model's. A layout of size 1 installs
    the same path with nothing to communicate. Outside any layout the model is left as it
    is.

    ``compile``: ``True``, a ``torch.compile`` backend name (``"aot_eager"``) or a dict of
    its options compiles each repeated transformer block with static shapes (regional
    compilation, as diffusers' ``compile_repeated_blocks``; the setting of
    :mod:`vidpar.nn.regional_compile`, as ``DiTConfig.compile``), inside a layout or not.

    Raises ``TypeError`` for a model class it does not know (:data:`SUPPORTED_MODELS`),
    ``ValueError`` when the heads do not split over ulysses × tp, and ``RuntimeError``
    for a model parallelised already.
    """
    name, family = _family(model)
    layout = _current_layout()
    if layout is not None:
        if getattr(model, "_vidpar_layout", None) is not None:
            raise RuntimeError(
                f"this {name} is parallelised already (for {model._vidpar_layout}); "
                "parallelize a fresh copy of the model"
            )
        # Checked once, where the model meets the layout.
        heads = model.config.num_attention_heads
        get_parallel_state().check_heads(heads)
        if heads % layout.tp.world_size:  # uneven heads work over ulysses, not yet here
            raise ValueError(
                f"num_heads({heads}) is not divisible by tp({layout.tp.world_size}): "
                f"{name}'s heads split over tp evenly only; choose a tp that divides {heads}"
            )
        if any(getattr(m, "fused_projections", False) for m in model.modules()):
            raise ValueError(
                "the model's attention projections are fused; call "
                "model.unfuse_qkv_projections() before vidpar.models.parallelize"
            )
        family.adapt(model, layout)
        model._vidpar_layout = layout.describe()
    options = compile_options(compile)
    if options is not None:
        _compile_blocks(model, family.blocks, options)
    return model
