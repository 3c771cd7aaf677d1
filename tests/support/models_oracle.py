"""Comparing a parallelised diffusers model with the unparallelised one (rank-side helpers
of tests/models/test_models_*.py)."""

from __future__ import annotations

import torch
from torch import nn

from vidpar.config import ParallelConfig
from vidpar.distributed.full_weights import shard_sizes, tensor_parallel_shard
from vidpar.distributed.state import get_parallel_state

#: The layouts every family's outputs and gradients are compared under.
LAYOUTS = {
    "sp2": ParallelConfig(sp=2),
    "ring2": ParallelConfig(ring=2),
    "ulysses2_ring2": ParallelConfig(ulysses=2, ring=2),
    "tp2": ParallelConfig(tp=2),
    "tp2_sp2": ParallelConfig(tp=2, sp=2),
}
#: CFG parallel: each cfg rank runs its half of the batch (the cond or the uncond branch),
#: over an sp group of its own (:func:`compare_under_layout`).
CFG_LAYOUT = ParallelConfig(cfg=2, sp=2)


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-300) -> float:
    """``‖actual - expected‖ / max(‖expected‖, floor)``."""
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).norm() / expected.norm().clamp_min(floor))


def gradient_errors(reference: nn.Module, model: nn.Module) -> dict[str, float]:
    """Relative error of every parameter gradient of ``model`` against ``reference``'s.

    Gradients are partial per sp rank (each holds its tokens' share) and per cfg rank (each
    its share of the batch), so they are summed over the sp and cfg groups first, as the
    strategy's gradient reduction does; a tp-sharded parameter is compared with the
    matching slice (even or uneven) of the full gradient. Gradients that
    are zero in exact arithmetic (a key bias shared by all keys: softmax ignores it) are
    measured against a millionth of the whole gradient's norm instead of their own.
    """
    state = get_parallel_state()
    sp, tp, cfg = state.group("sp"), state.group("tp"), state.group("cfg")
    expected = dict(reference.named_parameters())
    grads = [p.grad.flatten() for p in expected.values() if p.grad is not None]
    floor = 1e-6 * float(torch.cat(grads).norm())
    errors = {}
    for name, param in model.named_parameters():
        if expected[name].grad is None:  # a layer the inputs do not use (an I2V branch)
            if param.grad is not None:
                raise AssertionError(f"{name} got a gradient that the reference did not")
            continue
        if param.grad is None:  # fine where the reference's is zero (an unused output)
            if expected[name].grad.count_nonzero():
                raise AssertionError(f"{name} got no gradient")
            param.grad = torch.zeros_like(param)
        grad = cfg.all_reduce(sp.all_reduce(param.grad.clone()))
        full = expected[name].grad
        dim = getattr(param, "tensor_parallel_dim", None)
        if dim is not None:
            full = tensor_parallel_shard(full, dim, tp, shard_sizes(param))
        errors[name] = relative_error(grad, full, floor)
    return errors


def backward_both(reference_out: torch.Tensor, out: torch.Tensor, seed: int = 7) -> None:
    """Backpropagate the same random cotangent through both outputs."""
    gen = torch.Generator().manual_seed(seed)
    cotangent = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    (reference_out * cotangent).sum().backward()
    (out * cotangent).sum().backward()


def compare_under_layout(reference: nn.Module, model: nn.Module, inputs: dict) -> dict[str, float]:
    """Output and gradient errors of the parallelised ``model`` against ``reference`` on
    ``inputs`` (the same random cotangent through both). Under cfg each cfg rank runs its
    share of the batch (every tensor input whose first dim is the batch), as guidance
    runs the cond and uncond branches on different ranks."""
    expected = reference(**inputs, return_dict=False)[0]
    batch = expected.shape[0]
    cfg = get_parallel_state().group("cfg")
    share = batch // cfg.world_size
    rows = slice(cfg.rank_in_group * share, (cfg.rank_in_group + 1) * share)
    mine = {
        k: v[rows] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch else v
        for k, v in inputs.items()
    }
    out = model(**mine, return_dict=False)[0]
    gen = torch.Generator().manual_seed(7)
    cotangent = torch.randn(expected.shape, generator=gen, dtype=expected.dtype)
    (expected * cotangent).sum().backward()
    (out * cotangent[rows]).sum().backward()
    return {"output": relative_error(out, expected[rows]), **gradient_errors(reference, model)}


def worst(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """The largest error of each entry over the ranks."""
    return {name: max(errors[name] for errors in per_rank) for name in per_rank[0]}
