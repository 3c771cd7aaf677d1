"""Partial softmax-attention results of disjoint key blocks merged by their log-sum-exp.

Ring attention (and the exact math path of :mod:`vidpar.nn.attention_kernels`) computes
attention over one key block at a time; block ``b``'s output ``o_b`` and lse ``l_b``
combine as ``o = Σ exp(l_b - l) o_b`` with ``l = logaddexp(l_b, …)``. The weights and the
weighted sum are computed in float32 per element (float64 for float64 inputs) and the sum
is stored, in place, in the first block's output buffer, in its dtype: no float32 copy of
a whole output is made, and a merge is one pass over two outputs. On CUDA (Ampere or
newer, eager) each merge is one kernel that inductor generates.
"""

from __future__ import annotations

import torch

from vidpar.nn.elementwise import inductor_kernel, uses_inductor_kernels

__all__ = ["SoftmaxMerge", "merge_into"]


class SoftmaxMerge:
    """Accumulates partial results: :meth:`add` each block's ``(out, lse)``; the first
    block's ``out`` buffer becomes the accumulator. :attr:`out` and :attr:`lse` hold the
    merge so far."""

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        if self.out is None:
            self.out, self.lse = out, lse
        else:
            self.lse = merge_into(self.out, self.lse, out, lse)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged output (in the first block's dtype and buffer) and its lse."""
        if self.out is None:
            raise ValueError("no block was added to the merge")
        return self.out, self.lse


def _weights(
    acc_lse: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    merged = torch.logaddexp(acc_lse, lse)
    return (acc_lse - merged).exp().unsqueeze(-1), (lse - merged).exp().unsqueeze(-1), merged


def _merge_reference(
    acc: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> torch.Tensor:
    """Pointwise ops (inductor fuses them into one kernel writing ``acc``)."""
    keep, take, merged = _weights(acc_lse, lse)
    acc.copy_(acc.to(keep.dtype) * keep + out.to(keep.dtype) * take)
    return merged


def merge_into(
    acc: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> torch.Tensor:
    """Merge ``(out, lse)`` into ``(acc, acc_lse)``: ``acc`` (``[..., S, D]``) is
    overwritten with the merged output; returns the merged lse (``[..., S]``, in the lse
    dtype: float32, or float64)."""
    if uses_inductor_kernels(acc):
        return inductor_kernel(_merge_reference)(acc, acc_lse, out, lse)
    keep, take, merged = _weights(acc_lse, lse)
    if acc.dtype == keep.dtype:  # float32/float64: in place, exact in that precision
        acc.mul_(keep).addcmul_(out, take)
    else:  # low precision off CUDA: the float32 sum, then stored (a temporary)
        acc.copy_(torch.addcmul(acc * keep, out, take))
    return merged
