"""Test doubles of :mod:`vidpar.nn` for benchmarks and single-device tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vidpar.nn.ring_attention import RingMessage

__all__ = ["LocalRing"]


@dataclass
class _Delivered:
    """An exchange that has already arrived."""

    tensor: torch.Tensor

    def wait(self) -> torch.Tensor:
        return self.tensor


class LocalRing:
    """Rank 0 of a ring of ``len(kv_blocks)`` ranks on one device, with no communication:
    what one ring rank computes (pass it to :func:`~vidpar.nn.ring_attention.ring_attention` as
    the group). ``kv_blocks[j]`` (``[2, B, S_block, H, D]``, K and V stacked) is block
    ``j``; the rank holding block ``j`` receives block ``j - 1``. The dK/dV accumulators
    handed on are appended to ``sent_grads`` when ``keep_grads`` (the ``s``-th of a backward
    carries block ``-s mod size``) and zeros come back."""

    def __init__(self, kv_blocks: list[torch.Tensor], keep_grads: bool = False) -> None:
        self.rank, self.size = 0, len(kv_blocks)
        self.kv_blocks, self.keep_grads = kv_blocks, keep_grads
        self.sent_grads: list[torch.Tensor] = []

    def start(self, tensor: torch.Tensor, message: RingMessage) -> _Delivered:
        if message is RingMessage.KV:  # a block this class handed out, or else rank 0's own
            held = next((j for j, b in enumerate(self.kv_blocks) if b is tensor), 0)
            return _Delivered(self.kv_blocks[(held - 1) % self.size])
        if self.keep_grads:
            self.sent_grads.append(tensor)
        return _Delivered(torch.zeros_like(tensor))
