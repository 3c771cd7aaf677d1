"""DiTConfig: the sizes and switches of a :class:`~vidpar.nn.dit.VideoDiT`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vidpar.nn.activation_checkpointing import check_checkpointing

__all__ = ["MODULATIONS", "DiTConfig"]

#: ``DiTConfig.modulation`` values.
MODULATIONS = ("shared", "per_block")


@dataclass
class DiTConfig:
    """Sizes of a :class:`~vidpar.nn.dit.VideoDiT`.

    ``num_classes > 0`` makes the model class-conditional: label ``num_classes`` is the
    null class for classifier-free guidance, and each label becomes ``context_len`` tokens
    of width ``context_dim``. Text embeddings ``[B, L, context_dim]`` are accepted either
    way. ``ffn_dim`` is the MLP's hidden width (``None``: ``hidden_size × mlp_ratio``).

    ``modulation`` is how the flow time reaches the blocks' adaLN: ``"shared"`` (as Wan)
    projects it once, ``Linear(h, 6h)`` for all blocks, and each block adds its own
    learned ``[1, 6, h]`` table; ``"per_block"`` (as DiT) gives every block its own
    ``Linear(h, 6h)``, 6h² more parameters a block. Models saved before this setting
    existed are ``per_block`` (:meth:`from_saved`).

    ``activation_checkpointing`` recomputes each block's activations in the backward
    pass (with their collectives) instead of keeping them: far less memory for long videos,
    about a third more compute; ``"keep_attention"`` also keeps each self-attention's
    output, so its kernel is not run again (:mod:`vidpar.nn.activation_checkpointing`).
    ``compile`` compiles the block once for all blocks (regional compilation,
    :mod:`vidpar.nn.regional_compile`): ``True`` (inductor) or a ``torch.compile``
    backend name. Neither changes a weight or a result.
    """

    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    hidden_size: int = 64
    num_heads: int = 4
    depth: int = 2
    mlp_ratio: float = 4.0
    ffn_dim: int | None = None
    num_classes: int = 0
    context_dim: int = 64
    context_len: int = 4
    out_channels: int | None = None
    qk_norm: bool = True
    rope_theta: float = 10000.0
    freq_dim: int = 256
    eps: float = 1e-6
    modulation: str = "shared"
    activation_checkpointing: bool | str = False
    compile: bool | str = False

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must be (t, h, w), got {self.patch_size}")
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"hidden_size({self.hidden_size}) must be num_heads({self.num_heads}) × an "
                "even head_dim"
            )
        check_checkpointing(self.activation_checkpointing)
        if self.modulation not in MODULATIONS:
            raise ValueError(f"modulation must be one of {MODULATIONS}, got {self.modulation!r}")

    @classmethod
    def from_saved(cls, fields: Mapping[str, Any]) -> DiTConfig:
        """The config of saved hyper-parameters. Those written before ``modulation``
        existed (vidpar 0.1.0 without it) describe ``per_block`` models."""
        return cls(**{"modulation": "per_block", **fields})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return self.ffn_dim if self.ffn_dim is not None else int(self.hidden_size * self.mlp_ratio)
