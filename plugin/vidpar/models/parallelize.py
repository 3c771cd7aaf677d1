"""``parallelize(model)``: a diffusers video transformer prepared for the current layout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from torch import nn

from vidpar.distributed.state import get_parallel_state, model_parallel_is_initialized
from vidpar.models.cogvideox import COGVIDEOX_PLAN
from vidpar.models.flow_forward import FlowForward
from vidpar.models.hunyuan_video import HUNYUAN_VIDEO_15_PLAN, HUNYUAN_VIDEO_PLAN
from vidpar.models.ltx import LTX_PLAN
from vidpar.models.mochi import MOCHI_PLAN
from vidpar.models.plan import ModelPlan, apply_plan, check_heads
from vidpar.models.wan import SKYREELS_V2_PLAN, WAN_PLAN
from vidpar.nn.regional_compile import CompileSetting, compile_options

__all__ = [
    "PLANS",
    "SUPPORTED_MODELS",
    "context_parallel_plan",
    "family_plan",
    "latent_widths",
    "parallelize",
]

ModelT = TypeVar("ModelT", bound=nn.Module)

#: vidpar's plan of each diffusers model class it knows by name.
PLANS: dict[str, ModelPlan] = {
    "WanTransformer3DModel": WAN_PLAN,
    "SkyReelsV2Transformer3DModel": SKYREELS_V2_PLAN,
    "CogVideoXTransformer3DModel": COGVIDEOX_PLAN,
    "LTXVideoTransformer3DModel": LTX_PLAN,
    "HunyuanVideoTransformer3DModel": HUNYUAN_VIDEO_PLAN,
    "HunyuanVideo15Transformer3DModel": HUNYUAN_VIDEO_15_PLAN,
    "MochiTransformer3DModel": MOCHI_PLAN,
}
#: The diffusers model classes :func:`parallelize` knows.
SUPPORTED_MODELS: tuple[str, ...] = tuple(PLANS)


def latent_widths(config: Mapping[str, Any]) -> tuple[int, int | None]:
    """``(latent channels, prompt embedding width)`` that a diffusers model of ``config``
    (its ``config.json``) trains on, as its plan's
    :class:`~vidpar.models.flow_forward.FlowForward` says; else its ``in_channels`` and
    ``text_dim``."""
    plan = PLANS.get(config["_class_name"])
    flow = plan.flow if plan is not None else None
    if isinstance(flow, FlowForward):
        return flow.latent_channels(config), config.get(flow.text_dim)
    return config["in_channels"], config.get("text_dim")


def _plan(model: nn.Module) -> tuple[str, ModelPlan]:
    """The plan of the diffusers class ``model`` is (or derives from); for a class vidpar
    has no plan of but diffusers gives a ``_cp_plan``, the sequence-parallel plan read from
    it (:func:`context_parallel_plan`)."""
    plan = family_plan(type(model))
    if plan is not None:
        return type(model).__name__, plan
    raise TypeError(
        f"vidpar.models.parallelize does not know {type(model).__module__}."
        f"{type(model).__qualname__} (no vidpar plan and no diffusers _cp_plan say how its "
        f"attention and layers split: see README 'Bring your diffusers model'); it knows "
        f"these diffusers models: {', '.join(PLANS)}, and runs sequence parallel any class "
        "with a diffusers _cp_plan"
    )


def family_plan(cls: type[nn.Module]) -> ModelPlan | None:
    """vidpar's plan of the diffusers class ``cls`` is (or derives from), else the plan of
    its diffusers ``_cp_plan``, else ``None``."""
    for base in cls.__mro__:
        if base.__name__ in PLANS and base.__module__.startswith("diffusers."):
            return PLANS[base.__name__]
    return context_parallel_plan(cls) if getattr(cls, "_cp_plan", None) else None


def context_parallel_plan(cls: type[nn.Module]) -> ModelPlan:
    """The plan of a diffusers class known only by its ``_cp_plan``: its tokens split as it
    says, its own processors' context-parallel attention calls distributed (sp, no tp),
    its ``_repeated_blocks`` compiled (:mod:`vidpar.models.diffusers_cp`)."""
    return ModelPlan(
        blocks=tuple(getattr(cls, "_repeated_blocks", None) or ()),
        attention=".*",
        processor=None,
        flow=f"vidpar runs {cls.__name__} from diffusers' _cp_plan alone and does not know "
        "its forward's inputs",
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
    ``configure_model``, an Executor worker) the model's plan (:data:`PLANS`,
    :mod:`vidpar.models.plan`) is applied with the current
    :class:`~vidpar.distributed.ParallelState`: the self-attention runs through
    :class:`~vidpar.nn.attention.DistributedAttention` (Ulysses, Ring, USP) with the tokens
    sharded over sp once and gathered once at the output, and under tp the attention heads
    and the FFN are split into vidpar's column/row-parallel layers holding this rank's
    shards of the model's own weights, under their original names
    (``blocks.0.attn1.to_q.weight``; sharded ones carry ``tensor_parallel_dim``, so
    :func:`vidpar.distributed.full_weights.load_full_weights` and ``full_state_dict`` read and
    write diffusers checkpoints). The model keeps diffusers' forward signature and its
    output on every rank equals the unparallelised model's. A layout of size 1 installs
    the same path with nothing to communicate. Outside any layout the model is left as it
    is.

    ``compile``: ``True``, a ``torch.compile`` backend name (``"aot_eager"``) or a dict of
    its options compiles each repeated transformer block with static shapes (regional
    compilation, as diffusers' ``compile_repeated_blocks``; the setting of
    :mod:`vidpar.nn.regional_compile`, as ``DiTConfig.compile``), inside a layout or not.

    A diffusers class without a vidpar plan but with a ``_cp_plan`` (ChronoEdit,
    MiniMax-H3, Helios, ...) runs sequence parallel from that plan alone, its own
    attention processors kept (:mod:`vidpar.models.diffusers_cp`); tp is refused for it.

    Raises ``TypeError`` for a model class it does not know (neither in
    :data:`SUPPORTED_MODELS` nor with a ``_cp_plan``), ``ValueError`` when ulysses × tp
    exceed the heads (or tp is asked of a model that runs sequence parallel only), and
    ``RuntimeError`` for a model parallelised already.
    """
    name, plan = _plan(model)
    if model_parallel_is_initialized():
        state = get_parallel_state()
        if getattr(model, "_vidpar_layout", None) is not None:
            raise RuntimeError(
                f"this {name} is parallelised already (for {model._vidpar_layout}); "
                "parallelize a fresh copy of the model"
            )
        check_heads(state.parallel, getattr(model.config, plan.heads))
        if any(getattr(m, "fused_projections", False) for m in model.modules()):
            raise ValueError(
                "the model's attention projections are fused; call "
                "model.unfuse_qkv_projections() before vidpar.models.parallelize"
            )
        apply_plan(model, plan, state)
        model._vidpar_layout = repr(state.parallel)
    options = compile_options(compile)
    if options is not None:
        _compile_blocks(model, plan.blocks, options)
    return model
