"""LoRA adapters for any model whose sharded weights follow vidpar's tp contract.

An adapter is a dict of full (unsharded) low-rank factors keyed by weight name:
``"<name>.lora_A"`` of shape ``[r, in]`` and ``"<name>.lora_B"`` of shape ``[out, r]``, for a
weight whose full tensor splits into leading ``out`` and trailing ``in`` dims (a linear
``[out, in]``; the fused QKV ``[3, heads·dim, in]`` has ``out = 3·heads·dim``; a conv
``[out, c, kt, kh, kw]`` has ``in = c·kt·kh·kw``), and an optional scalar ``"scale"``
(default 1). Merging adds ``scale · B @ A`` reshaped to the full weight; on a weight
sharded over tp (``tensor_parallel_dim``) each rank slices the factor on the sharded side
first and adds only its own chunk, so nothing full-sized is built and nothing is
communicated. Unmerging restores the saved base shards bit for bit.

:func:`vidpar.nn.lora_peft.peft_to_adapter` reads LoRA files in the diffusers/PEFT layout
(and kohya's ``lora_down``/``lora_up``) into this format; :func:`extract_adapter` makes an
adapter from two sets of full weights (a base and a fine-tune) and :func:`save_adapter`
writes one.

Two file formats: this module's *vidpar adapter* (:func:`save_adapter`; vidpar reads it,
diffusers does not) and the *diffusers LoRA* that :mod:`vidpar.nn.lora_peft` writes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from vidpar.distributed.full_weights import shard_groups, shard_sizes, tensor_parallel_shard
from vidpar.distributed.group import GroupCoordinator

__all__ = [
    "LoraManager",
    "adapter_targets",
    "extract_adapter",
    "load_adapter",
    "save_adapter",
    "shard_delta",
]

_A, _B, _SCALE = ".lora_A", ".lora_B", "scale"
Adapter = dict[str, torch.Tensor]


def load_adapter(path_or_state: str | os.PathLike | Mapping[str, torch.Tensor]) -> Adapter:
    """An adapter from a ``.safetensors`` file, a ``torch.save`` file, or a mapping; a
    damaged file or a NaN or infinite value raises ``ValueError`` naming the file."""
    if isinstance(path_or_state, Mapping):
        state = dict(path_or_state)
    elif isinstance(path_or_state, str | os.PathLike):
        path = Path(path_or_state)
        if not path.is_file():
            raise FileNotFoundError(f"LoRA adapter {path} does not exist")
        state = _read_lora_file(path)
    else:
        raise TypeError(
            f"a LoRA adapter is a path or a dict of tensors, got {type(path_or_state).__name__}"
        )
    if _SCALE in state and not isinstance(state[_SCALE], torch.Tensor):
        state[_SCALE] = torch.tensor(float(state[_SCALE]), dtype=torch.float64)
    where = "LoRA adapter" + ("" if isinstance(path_or_state, Mapping) else f" {path_or_state}")
    for key, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            _check_finite(where, key, tensor)
    return state


def _read_lora_file(path: Path) -> Adapter:
    """The tensors of a ``.safetensors`` or ``torch.save`` (``weights_only``) LoRA file; an
    unreadable one (truncated, damaged, not a dict of tensors) raises ``ValueError``
    naming it."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # SafetensorError, pickle and zip errors: a damaged file
        raise ValueError(
            f"LoRA file {path} cannot be read ({type(err).__name__}: {err}); it may be "
            "truncated or damaged: copy or save it again"
        ) from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not an adapter dict")
    return dict(state)


def _check_finite(where: str, key: str, tensor: torch.Tensor) -> None:
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        raise ValueError(
            f"{where}: {key} holds {int((~finite).sum())} NaN or infinite values of "
            f"{tensor.numel()}: merged, it would make every output NaN; use an intact adapter"
        )


def adapter_targets(adapter: Mapping[str, torch.Tensor]) -> list[str]:
    """The weight names an adapter changes."""
    return sorted(k.removesuffix(_A) for k in adapter if k.endswith(_A))


def extract_adapter(
    base: str | os.PathLike | Mapping[str, torch.Tensor],
    tuned: str | os.PathLike | Mapping[str, torch.Tensor],
    rank: int,
) -> Adapter:
    """The adapter of rank ``rank`` that best turns full weights ``base`` into ``tuned``
    (``.safetensors`` paths or state dicts of one model, e.g. before and after a fine-tune).

    Each changed weight of two or more dims gives the ``rank`` largest singular values of
    its difference (as a matrix ``[out, in]`` split where the sides are most balanced): the
    best approximation of that rank, exact for a change of rank ``<= rank``. One-dim
    entries (biases, norms) are not carried: an adapter changes matrices only."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    before, after = _full_tensors(base), _full_tensors(tuned)
    if before.keys() != after.keys():
        raise ValueError(f"entries differ: {sorted(before.keys() ^ after.keys())[:5]}")
    adapter: Adapter = {}
    for name, weight in sorted(after.items()):
        if weight.shape != before[name].shape:
            raise ValueError(f"{name}: shapes differ: {before[name].shape} and {weight.shape}")
        if weight.dim() < 2 or not weight.is_floating_point():
            continue
        delta = weight.double() - before[name].double()
        if not delta.any():
            continue
        shape = list(delta.shape)
        k = max(range(1, len(shape)), key=lambda k: min(math.prod(shape[:k]), math.prod(shape[k:])))
        u, s, vh = torch.linalg.svd(delta.reshape(math.prod(shape[:k]), -1), full_matrices=False)
        r = min(rank, s.numel())
        adapter[f"{name}{_A}"] = vh[:r].to(weight.dtype).contiguous()
        adapter[f"{name}{_B}"] = (u[:, :r] * s[:r]).to(weight.dtype).contiguous()
    if not adapter:
        raise ValueError("base and tuned weights do not differ in any matrix")
    return adapter


def save_adapter(adapter: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write an adapter (full factors, optional ``scale``) as a ``.safetensors`` file in
    vidpar's adapter format (vidpar reads it; for diffusers write
    :func:`vidpar.nn.lora_peft.save_peft_lora` of ``adapter_to_peft(adapter)``)."""
    from safetensors.torch import save_file

    tensors = {k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in adapter.items()}
    save_file(tensors, os.fspath(path))
    return Path(path)


def _full_tensors(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict:
    from safetensors.torch import load_file

    return dict(source) if isinstance(source, Mapping) else load_file(os.fspath(source))


def _split_point(full_shape: list[int], out: int, inp: int) -> int | None:
    """``k`` with ``prod(full_shape[:k]) == out`` and ``prod(full_shape[k:]) == inp``."""
    for k in range(1, len(full_shape)):
        if math.prod(full_shape[:k]) == out and math.prod(full_shape[k:]) == inp:
            return k
    return None


def _full_shape(param: torch.Tensor, group: GroupCoordinator | None) -> list[int]:
    shape = list(param.shape)
    dim = getattr(param, "tensor_parallel_dim", None)
    if dim is not None and group is not None:
        sizes = shard_sizes(param)
        shape[dim] = sum(sizes) if sizes else shape[dim] * group.world_size
    return shape


def _check_factors(
    target: str, param: torch.Tensor, full_shape: list[int], a: object, b: object
) -> None:
    """Raise ``ValueError`` unless ``B @ A`` fits the full weight ``full_shape``."""
    where = f"LoRA factors of {target}"
    for key, factor in (("lora_A", a), ("lora_B", b)):
        if not isinstance(factor, torch.Tensor) or not factor.is_floating_point():
            raise ValueError(f"{where}: {key} must be a floating-point tensor, got {factor!r:.80}")
        if factor.dim() != 2:
            raise ValueError(f"{where}: {key} must be 2-D, got shape {tuple(factor.shape)}")
    if a.shape[0] != b.shape[1]:
        raise ValueError(
            f"{where}: ranks differ: lora_A {tuple(a.shape)} is [r, in] with r={a.shape[0]} "
            f"but lora_B {tuple(b.shape)} is [out, r] with r={b.shape[1]}"
        )
    if param.dim() < 2 or _split_point(full_shape, b.shape[0], a.shape[1]) is None:
        raise ValueError(
            f"{where}: B @ A is [{b.shape[0]}, {a.shape[1]}], which does not fit the full "
            f"weight of shape {tuple(full_shape)} (factors are full, unsharded tensors: "
            "lora_A [r, in], lora_B [out, r], with out × in the weight's leading × trailing "
            "dims)"
        )


def shard_delta(
    param: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    group: GroupCoordinator | None = None,
) -> torch.Tensor:
    """``scale · B @ A`` as this rank's shard of ``param``'s full tensor, in float32 or
    wider (``param``'s dtype promoted), on ``param``'s device.

    ``group`` is the tp group ``param`` is split over when it has a ``tensor_parallel_dim``
    (``None``: the whole tensor). The factor on the sharded side (B for output dims, A for
    input dims) is cut to this rank's chunk (uneven ones too) before multiplying.
    """
    full_shape = _full_shape(param, group)
    _check_factors("the weight", param, full_shape, lora_a, lora_b)
    k = _split_point(full_shape, lora_b.shape[0], lora_a.shape[1])
    dtype = torch.promote_types(param.dtype, torch.float32)
    a = lora_a.to(param.device, dtype).reshape(-1, *full_shape[k:])  # [r, *in]
    b = lora_b.to(param.device, dtype).reshape(*full_shape[:k], -1)  # [*out, r]
    dim = getattr(param, "tensor_parallel_dim", None)
    if dim is not None and group is not None and group.world_size > 1:
        sizes = shard_sizes(param)
        if dim < k:
            b = tensor_parallel_shard(b, dim, group, sizes)
        else:
            a = tensor_parallel_shard(a, dim - k + 1, group, sizes)
    delta = b.reshape(-1, b.shape[-1]) @ a.reshape(a.shape[0], -1)
    return (delta * scale).reshape(param.shape)


class LoraManager:
    """Named adapters for one model: set them, merge one into the weights, unmerge it.

    Works on any tp layout: every rank of the model holds the same full factors and adds
    its own chunk of the update. Every method checks everything before it changes a
    weight, so a rejected adapter leaves the model and the manager as they were.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapters: dict[str, Adapter] = {}
        self.merged: str | None = None
        self._base: dict[str, torch.Tensor] = {}

    def _params(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    def set_adapter(
        self, name: str, path_or_state: str | os.PathLike | Mapping[str, torch.Tensor]
    ) -> list[str]:
        """Register (or replace) adapter ``name``; returns the weights it targets.

        Raises ``ValueError`` for entries that are not ``<weight>.lora_A``,
        ``<weight>.lora_B`` or ``scale``, unpaired factors, unknown weights and factors
        that do not fit; ``RuntimeError`` when ``name`` is merged (unmerge it first).
        """
        if name == self.merged:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge it before replacing it")
        adapter = load_adapter(path_or_state)
        stray = sorted(k for k in adapter if k != _SCALE and not k.endswith((_A, _B)))
        if stray:
            raise ValueError(
                f"adapter {name!r} has entries that are not '<weight>.lora_A', "
                f"'<weight>.lora_B' or 'scale': {stray[:5]}"
            )
        targets = adapter_targets(adapter)
        if not targets:
            raise ValueError(f"adapter {name!r} has no '<weight>.lora_A' entries")
        b_targets = sorted(k.removesuffix(_B) for k in adapter if k.endswith(_B))
        if b_targets != targets:
            only_a = sorted(set(targets) - set(b_targets))
            only_b = sorted(set(b_targets) - set(targets))
            raise ValueError(
                f"adapter {name!r} has unpaired factors: lora_A without lora_B for "
                f"{only_a[:5]}, lora_B without lora_A for {only_b[:5]}"
            )
        params = self._params()
        unknown = [t for t in targets if t not in params]
        if unknown:
            raise ValueError(
                f"adapter {name!r} targets weights the model does not have: {unknown[:5]} "
                f"(weight names look like {list(params)[:3]})"
            )
        scale = adapter.get(_SCALE)
        if scale is not None and (scale.numel() != 1 or not torch.isfinite(scale).all()):
            raise ValueError(f"adapter {name!r}: scale must be one finite number, got {scale}")
        groups = shard_groups(self.model)
        for target in targets:
            param = params[target]
            full = _full_shape(param, groups.get(id(param)))
            _check_factors(target, param, full, adapter[target + _A], adapter[target + _B])
        self.adapters[name] = adapter
        return targets

    @torch.no_grad()
    def merge(self, name: str | None = None) -> str:
        """Add adapter ``name`` (default: the only one set) into the weights; returns its
        name."""
        if self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is merged already; unmerge it first")
        if name is None:
            if len(self.adapters) != 1:
                raise ValueError(
                    f"name the adapter to merge; set: {sorted(self.adapters) or 'none'}"
                )
            name = next(iter(self.adapters))
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r}; set: {sorted(self.adapters) or 'none'}")
        adapter = self.adapters[name]
        scale = float(adapter[_SCALE]) if _SCALE in adapter else 1.0
        params = self._params()
        groups = shard_groups(self.model)
        try:
            for target in adapter_targets(adapter):  # one delta at a time: bounded memory
                param = params[target]
                delta = shard_delta(
                    param, adapter[target + _A], adapter[target + _B], scale, groups.get(id(param))
                )
                self._base[target] = param.detach().clone()
                param.copy_((param.to(delta.dtype) + delta).to(param.dtype))
                del delta
        except BaseException:  # e.g. out of memory: leave the model as it was
            self._restore(params)
            raise
        self.merged = name
        return name

    @torch.no_grad()
    def unmerge(self) -> str | None:
        """Restore the base weights exactly; returns the adapter that was merged, if any."""
        self._restore(self._params())
        name, self.merged = self.merged, None
        return name

    def _restore(self, params: dict[str, nn.Parameter]) -> None:
        for target, base in self._base.items():
            params[target].copy_(base)
        self._base.clear()
