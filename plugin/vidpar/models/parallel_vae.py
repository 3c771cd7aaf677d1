"""``parallelize_vae(vae)``: a diffusers Wan VAE whose encode and decode are split in rows
over the ranks of a group, exactly.

Every rank of the group calls ``vae.decode(latents)`` (or ``vae.encode(video)``) with the
same whole input and gets the same whole result, equal to the one-process VAE's; in
between each rank holds only its block of rows (latent rows split as evenly as they go,
pixel rows the same blocks times the spatial scale, so every up- and downsampling keeps
the block borders aligned). What crosses a block border is exchanged, not approximated:

* every convolution whose kernel reaches over rows (the causal 3D convolutions, the 2D
  convolutions after upsampling, the zero padding before a strided downsampling) pads
  its row block with the neighbours' border rows (:func:`vidpar.nn.halo.halo_pad`); the
  causal cache of past frames is each rank's own rows, so the frame-by-frame decode and
  the four-frame encode chunks work unchanged;
* the attention blocks (the mid-block's attention over each frame's whole plane, at the
  lowest resolution) gather keys and values of all rows; each rank keeps its queries;
* ``WanRMS_norm`` normalises each position over channels and the clamp, the 1×1×1
  convolutions and the nearest upsampling work per position or per aligned block: local.

The modules are patched in place (their weights and state-dict names stay); a patched
module called outside a split ``encode``/``decode`` (``vae.decoder(x)`` directly) runs
as it always did. A VAE class other than ``AutoencoderKLWan`` runs whole on every rank,
with a log line saying so.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from vidpar.distributed.group import GroupCoordinator
from vidpar.distributed.state import get_parallel_state
from vidpar.nn.halo import gather_rows, halo_pad, split_sizes

__all__ = ["SUPPORTED_VAES", "parallelize_vae"]

logger = logging.getLogger(__name__)

VaeT = TypeVar("VaeT", bound=nn.Module)

#: The diffusers VAE classes :func:`parallelize_vae` splits over ranks.
SUPPORTED_VAES: tuple[str, ...] = ("AutoencoderKLWan",)


@dataclass
class _RowSplit:
    """The group a VAE is split over and, during a split call, every rank's latent rows."""

    group: GroupCoordinator
    rows: list[int] | None = field(default=None)

    @property
    def active(self) -> bool:
        return self.rows is not None

    def rows_at(self, local_rows: int) -> list[int]:
        """Every rank's rows at the resolution where this rank has ``local_rows``."""
        own = self.rows[self.group.rank_in_group]
        return [r * local_rows // own for r in self.rows]


def parallelize_vae(vae: VaeT, group: GroupCoordinator | None = None) -> VaeT:
    """Split ``vae``'s ``encode`` and ``decode`` in rows over ``group`` (default: this
    process's replica: the layout's ``"replica"`` group, the ranks that share a batch), in
    place; returns ``vae``.

    Afterwards every rank of the group must call ``encode``/``decode`` together with the
    same input, and gets the whole result. A group of one, or a VAE class not in
    :data:`SUPPORTED_VAES`, leaves ``vae`` whole (logged). Calling it again moves the
    VAE to the new group.
    """
    if group is not None and not isinstance(group, GroupCoordinator):
        raise TypeError(
            f"parallelize_vae(group=...) takes a vidpar GroupCoordinator (e.g. "
            f"get_parallel_state().group('sp')), not {type(group).__name__}"
        )
    group = get_parallel_state().group("replica") if group is None else group
    name = type(vae).__name__
    if not _is_supported(vae):
        logger.warning(
            "vidpar.parallelize_vae: %s cannot be split over ranks (it knows %s); it runs "
            "whole on every rank",
            name,
            ", ".join(SUPPORTED_VAES),
        )
        return vae
    split = getattr(vae, "_vidpar_row_split", None)
    if split is not None:
        split.group = group
    elif group.world_size > 1:
        split = _RowSplit(group)
        _patch_wan(vae, split)
        vae._vidpar_row_split = split
    if group.world_size == 1:
        logger.info("vidpar.parallelize_vae: a group of one rank; %s runs whole", name)
    else:
        logger.info(
            "vidpar.parallelize_vae: %s split in rows over %d ranks %s",
            name,
            group.world_size,
            group.ranks,
        )
    return vae


def _is_supported(vae: nn.Module) -> bool:
    return any(
        cls.__name__ in SUPPORTED_VAES and cls.__module__.startswith("diffusers.")
        for cls in type(vae).__mro__
    )


# Patching ----------------------------------------------------------------------------


def _patch_wan(vae: nn.Module, split: _RowSplit) -> None:
    """Give every row-reaching module of an ``AutoencoderKLWan`` its split forward and
    wrap ``_encode``/``_decode`` to split the input and gather the output."""
    for module in vae.modules():
        kind = type(module).__name__
        if kind == "WanCausalConv3d" and module._padding[2:4] != (0, 0):
            _replace_forward(module, split, _causal_conv3d)
        elif kind == "WanAttentionBlock":
            _replace_forward(module, split, _attention)
        elif kind == "WanResample" and module.mode != "none":
            pad_or_conv = module.resample[0 if module.mode.startswith("down") else 1]
            if isinstance(pad_or_conv, nn.Conv2d) and pad_or_conv.padding_mode != "zeros":
                raise ValueError(f"{pad_or_conv} pads with {pad_or_conv.padding_mode!r}")
            step = _zero_pad if isinstance(pad_or_conv, nn.ZeroPad2d) else _conv2d
            _replace_forward(pad_or_conv, split, step)
    vae._decode = functools.partial(_split_decode, vae, split, vae._decode)
    vae._encode = functools.partial(_split_encode, vae, split, vae._encode)


def _replace_forward(module: nn.Module, split: _RowSplit, split_forward: Callable) -> None:
    """``module.forward`` becomes ``split_forward`` during a split call, else the class's."""
    whole_forward = type(module).forward

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        if split.active:
            return split_forward(module, split, *args, **kwargs)
        return whole_forward(module, *args, **kwargs)

    module.forward = forward


# Split forwards: each the class's forward with the row border handled ------------------


def _causal_conv3d(
    conv: nn.Conv3d, split: _RowSplit, x: torch.Tensor, cache_x: torch.Tensor | None = None
) -> torch.Tensor:
    """``WanCausalConv3d.forward`` with the rows above and below taken from the neighbours."""
    padding = list(conv._padding)  # (left, right, top, bottom, past frames, 0)
    if cache_x is not None and padding[4] > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        padding[4] -= cache_x.shape[2]
    return nn.Conv3d.forward(conv, halo_pad(x, split.group, 3, padding))


def _conv2d(conv: nn.Conv2d, split: _RowSplit, x: torch.Tensor) -> torch.Tensor:
    """A zero-padded ``Conv2d`` over row blocks (the convolution after an upsampling)."""
    rows, cols = conv.padding
    x = halo_pad(x, split.group, 2, (cols, cols, rows, rows))
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def _zero_pad(pad: nn.ZeroPad2d, split: _RowSplit, x: torch.Tensor) -> torch.Tensor:
    """The zero padding before a strided downsampling: rows below come from the next rank."""
    return halo_pad(x, split.group, 2, pad.padding)


def _attention(block: nn.Module, split: _RowSplit, x: torch.Tensor) -> torch.Tensor:
    """``WanAttentionBlock.forward`` (one head over each frame's plane) for a row block:
    local queries against the keys and values of all rows."""
    identity = x
    b, c, t, h, w = x.shape
    x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    q, k, v = block.to_qkv(block.norm(x)).chunk(3, dim=1)
    kv = gather_rows(torch.cat([k, v], dim=1), split.group, 2, split.rows_at(h))
    k, v = kv.chunk(2, dim=1)

    def tokens(y: torch.Tensor) -> torch.Tensor:  # (b t, c, h, w) -> (b t, 1, h w, c)
        return y.flatten(2).transpose(1, 2).unsqueeze(1)

    out = F.scaled_dot_product_attention(tokens(q), tokens(k), tokens(v))
    out = block.proj(out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
    return out.view(b, t, c, h, w).permute(0, 2, 1, 3, 4) + identity


# Splitting the input, gathering the output --------------------------------------------


def _whole_reason(split: _RowSplit, latent_rows: int) -> str | None:
    if latent_rows < split.group.world_size:
        return f"{latent_rows} latent rows are fewer than the {split.group.world_size} ranks"
    return None


def _run_split(vae: nn.Module, split: _RowSplit, rows: list[int], call: Callable[[], Any]):
    tiling = vae.use_tiling
    if tiling:
        logger.warning("vidpar.parallelize_vae: tiling is off while the VAE is split in rows")
    split.rows, vae.use_tiling = rows, False
    try:
        return call()
    finally:
        split.rows, vae.use_tiling = None, tiling


def _split_decode(
    vae: nn.Module,
    split: _RowSplit,
    whole_decode: Callable,
    z: torch.Tensor,
    return_dict: bool = True,
) -> Any:
    """``_decode`` on this rank's latent rows; the pixel rows of all ranks gathered."""
    reason = _whole_reason(split, z.shape[3])
    if reason is not None:
        logger.warning("vidpar.parallelize_vae: %s; this decode runs whole", reason)
        return whole_decode(z, return_dict=return_dict)
    rows = split_sizes(z.shape[3], split.group.world_size)
    rank = split.group.rank_in_group
    local = z.narrow(3, sum(rows[:rank]), rows[rank])
    out = _run_split(vae, split, rows, lambda: whole_decode(local, return_dict=True)).sample
    scale = out.shape[3] // rows[rank]
    out = gather_rows(out, split.group, 3, [r * scale for r in rows])
    return _decoder_output(out) if return_dict else (out,)


def _decoder_output(sample: torch.Tensor) -> Any:
    from diffusers.models.autoencoders.vae import DecoderOutput

    return DecoderOutput(sample=sample)


def _split_encode(
    vae: nn.Module, split: _RowSplit, whole_encode: Callable, x: torch.Tensor
) -> torch.Tensor:
    """``_encode`` on this rank's pixel rows; the latent moments of all ranks gathered."""
    scale = vae.spatial_compression_ratio
    reason = _whole_reason(split, x.shape[3] // scale)
    if x.shape[3] % scale:
        reason = f"a height of {x.shape[3]} is not a multiple of the spatial scale {scale}"
    if reason is not None:
        logger.warning("vidpar.parallelize_vae: %s; this encode runs whole", reason)
        return whole_encode(x)
    rows = split_sizes(x.shape[3] // scale, split.group.world_size)
    rank = split.group.rank_in_group
    local = x.narrow(3, sum(rows[:rank]) * scale, rows[rank] * scale)
    moments = _run_split(vae, split, rows, lambda: whole_encode(local))
    return gather_rows(moments, split.group, 3, rows)
