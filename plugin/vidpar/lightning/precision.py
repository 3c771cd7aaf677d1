"""Lightning's precision plugins with gradient-norm clipping over tp shards.

Under tp each rank holds its shards of the sharded parameters' gradients: Lightning's
``clip_grad_by_norm`` would see them alone and tp ranks would clip by different factors.
The subclasses here clip by the global norm (:func:`vidpar.distributed.grad_clip.clip_grad_norm_`)
and are otherwise the plugin the Trainer's ``precision`` chose.
"""

from __future__ import annotations

from lightning.pytorch.plugins.precision import (
    DoublePrecision,
    HalfPrecision,
    MixedPrecision,
    Precision,
)
from torch import nn
from torch.optim import Optimizer

from vidpar.distributed.grad_clip import clip_grad_norm_


class TensorParallelClipping:
    """Mixed into a :class:`Precision`: ``clip_grad_by_norm`` over the global norm of the
    ``module``'s gradients, tp shards summed over their groups."""

    module: nn.Module

    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        parameters = list(self.main_params(optimizer))  # type: ignore[attr-defined]
        clip_grad_norm_(self.module, parameters, float(clip_val))


class TensorParallelPrecision(TensorParallelClipping, Precision):
    """``precision="32-true"`` under tp."""


class TensorParallelDoublePrecision(TensorParallelClipping, DoublePrecision):
    """``precision="64-true"`` under tp."""


class TensorParallelMixedPrecision(TensorParallelClipping, MixedPrecision):
    """``precision="bf16-mixed"`` / ``"16-mixed"`` under tp."""


class TensorParallelHalfPrecision(TensorParallelClipping, HalfPrecision):
    """``precision="bf16-true"`` / ``"16-true"`` under tp."""


#: The plugin each of Lightning's precisions becomes under tp.
TENSOR_PARALLEL_PLUGINS: dict[type[Precision], type[Precision]] = {
    Precision: TensorParallelPrecision,
    DoublePrecision: TensorParallelDoublePrecision,
    MixedPrecision: TensorParallelMixedPrecision,
    HalfPrecision: TensorParallelHalfPrecision,
}


def with_tensor_parallel_clipping(plugin: Precision, module: nn.Module) -> Precision:
    """``plugin`` as its tp subclass, with the same settings, clipping ``module``'s
    gradients by their global norm; raises ``ValueError`` naming a plugin it has none for."""
    if isinstance(plugin, TensorParallelClipping):
        plugin.module = module
        return plugin
    subclass = TENSOR_PARALLEL_PLUGINS.get(type(plugin))
    if subclass is None:
        known = ", ".join(sorted(cls.__name__ for cls in TENSOR_PARALLEL_PLUGINS))
        raise ValueError(
            f"the precision plugin {type(plugin).__name__} cannot clip gradients over tp "
            f"shards; under tp > 1 use one of Lightning's {known} (Trainer(precision="
            "'32-true' | '64-true' | 'bf16-mixed' | 'bf16-true' ...)), or tp=1."
        )
    clipping = subclass.__new__(subclass)
    clipping.__dict__.update(vars(plugin))  # the same settings (dtype, scaler, device)
    clipping.module = module
    return clipping
