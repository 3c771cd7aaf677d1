"""LoRA files in diffusers' PEFT layout, the format the ecosystem loads: read and written.

:func:`peft_to_adapter` reads such files (and kohya's) into a vidpar adapter;
:func:`save_peft_lora` writes ``pytorch_lora_weights.safetensors`` as diffusers'
``save_lora_weights`` does (keys ``transformer.<module>.lora_A.weight``, the LoraConfig in the
header), which diffusers' ``load_lora_weights``, PEFT and vidpar's ``set_lora_adapter``
(:func:`peft_to_adapter`) read; :func:`adapter_to_peft` turns a vidpar adapter
(:mod:`vidpar.nn.lora`'s own format) into such factors.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from vidpar.nn.lora import (
    _A,
    _B,
    _SCALE,
    Adapter,
    _check_finite,
    _read_lora_file,
    adapter_targets,
    load_adapter,
)

__all__ = [
    "LORA_WEIGHTS",
    "PEFT_PREFIXES",
    "adapter_to_peft",
    "check_output_folder",
    "peft_to_adapter",
    "save_peft_lora",
]

#: The file name diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` reads.
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
_PEFT_A, _PEFT_B = ".lora_A.weight", ".lora_B.weight"

#: Key prefixes of LoRA files written for whole pipelines or by PEFT, stripped on reading.
PEFT_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.")
_PEFT_FACTORS = {
    ".lora_A.weight": _A,
    ".lora_B.weight": _B,
    ".lora_down.weight": _A,
    ".lora_up.weight": _B,
}
_PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig record in safetensors


def _peft_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """A LoRA file's tensors and the LoraConfig that diffusers records in its metadata."""
    if path.suffix != ".safetensors":
        return load_adapter(path), {}
    from safetensors import safe_open

    state = _read_lora_file(path)  # names a damaged file
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    config = json.loads(metadata.get(_PEFT_METADATA_KEY, "{}"))
    return state, {k.rpartition(".")[2]: v for k, v in config.items()}


def peft_to_adapter(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    scale: float = 1.0,
    alpha: float | None = None,
) -> Adapter:
    """An adapter from a LoRA in the diffusers/PEFT layout.

    Keys ``<module>.lora_A.weight`` ``[r, in]`` and ``<module>.lora_B.weight`` ``[out, r]``
    (or kohya's ``lora_down``/``lora_up``; conv factors are flattened), with the prefixes
    :data:`PEFT_PREFIXES` stripped, become ``<module>.weight.lora_A/lora_B``. Each
    module's update ``B @ A`` is scaled by ``alpha / r`` (PEFT's scaling; ``alpha / √r``
    with rsLoRA), folded into its B factor: alpha is the module's ``<module>.alpha``
    entry, else ``alpha``, else the ``lora_alpha`` that diffusers records in a
    ``.safetensors`` file's metadata, else r (a factor of 1). ``scale`` is the strength
    the whole adapter is merged with. Other entries (full ``.diff`` deltas, LoRA biases)
    raise ``ValueError``.
    """
    config: dict[str, object] = {}
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"LoRA file {path} does not exist")
        state, config = _peft_file(path)
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise ValueError("LoRA files with per-module alpha_pattern/rank_pattern are not supported")
    default_alpha = alpha if alpha is not None else config.get("lora_alpha")
    rslora = bool(config.get("use_rslora", False))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    stray = []
    for key, tensor in state.items():
        name = key
        for prefix in PEFT_PREFIXES:
            name = name.removeprefix(prefix)
        suffix = next((s for s in _PEFT_FACTORS if name.endswith(s)), None)
        if suffix is not None:
            module = name.removesuffix(suffix)
            factors.setdefault(module, {})[_PEFT_FACTORS[suffix]] = tensor
        elif name.endswith(".alpha"):
            alphas[name.removesuffix(".alpha")] = float(tensor)
        else:
            stray.append(key)
    if stray:
        raise ValueError(
            f"LoRA entries that are not lora_A/lora_B (lora_down/lora_up) factors or alphas: "
            f"{sorted(stray)[:5]}"
        )
    adapter: Adapter = {_SCALE: torch.tensor(float(scale), dtype=torch.float64)}
    for module, pair in sorted(factors.items()):
        if set(pair) != {_A, _B}:
            raise ValueError(f"LoRA factors of {module} are unpaired: found only {sorted(pair)}")
        where = f"LoRA factors of {module}" + (
            "" if isinstance(source, Mapping) else f" in {source}"
        )
        for key, tensor in (("lora_A", pair[_A]), ("lora_B", pair[_B])):
            _check_finite(where, key, tensor)
        a = pair[_A].reshape(pair[_A].shape[0], -1)
        b = pair[_B].reshape(pair[_B].shape[0], -1)
        rank = a.shape[0]
        module_alpha = alphas.get(module, default_alpha)
        factor = (
            1.0
            if module_alpha is None
            else float(module_alpha) / (math.sqrt(rank) if rslora else rank)
        )
        if not math.isfinite(factor):
            raise ValueError(f"{where}: alpha {module_alpha} gives the scale {factor}")
        adapter[f"{module}.weight{_A}"] = a
        # Folded in float64: the scaled factor is as exact as the file's.
        adapter[f"{module}.weight{_B}"] = b if factor == 1.0 else b.double() * factor
    return adapter


def adapter_to_peft(adapter: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A vidpar adapter as diffusers/PEFT factors (``<module>.lora_A.weight`` ``[r, in]``,
    ``<module>.lora_B.weight`` ``[out, r]``, for alpha = r): its ``scale`` folded into B.
    Weights named other than ``<module>.weight`` have no PEFT name (``ValueError``)."""
    adapter = load_adapter(adapter)
    scale = float(adapter.get(_SCALE, 1.0))
    factors = {}
    for target in adapter_targets(adapter):
        if not target.endswith(".weight"):
            raise ValueError(f"{target}: PEFT adapts '<module>.weight' entries only")
        module = target.removesuffix(".weight")
        b = adapter[target + _B]
        factors[module + _PEFT_A] = adapter[target + _A]
        factors[module + _PEFT_B] = b if scale == 1.0 else (b.double() * scale).to(b.dtype)
    return factors


def check_output_folder(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as a path, when it is missing or an empty folder; else
    ``FileExistsError`` naming what is there (a LoRA export overwrites nothing)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        found = sorted(p.name for p in out_dir.iterdir())[:5] if out_dir.is_dir() else "a file"
        raise FileExistsError(
            f"the LoRA output folder {out_dir} exists and is not empty ({found}): nothing was "
            "written. Give a new or empty folder"
        )
    return out_dir


def save_peft_lora(
    factors: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    alpha: float | None = None,
    prefix: str = "transformer",
) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` as diffusers' ``save_lora_weights``
    does: keys ``<prefix>.<module>.lora_A.weight``/``.lora_B.weight`` and, in the header,
    the LoraConfig (``r``, ``lora_alpha``: ``alpha``, default r; ``target_modules``) keyed
    ``<prefix>.<field>`` under ``lora_adapter_metadata``. Returns the file.

    ``factors`` are full tensors keyed ``<module>.lora_A.weight``/``.lora_B.weight`` of one
    rank. ``out_dir`` must be missing or empty (``FileExistsError`` naming what is there:
    nothing is overwritten); the file appears atomically."""
    out_dir = check_output_folder(out_dir)
    modules = sorted(k.removesuffix(_PEFT_A) for k in factors if k.endswith(_PEFT_A))
    stray = sorted(set(factors) - {m + s for m in modules for s in (_PEFT_A, _PEFT_B)})
    if not modules or stray:
        raise ValueError(
            f"LoRA factors must be '<module>.lora_A.weight' and '.lora_B.weight' pairs; "
            f"{'none given' if not modules else f'unpaired or other entries: {stray[:5]}'}"
        )
    ranks = {factors[m + _PEFT_A].shape[0] for m in modules}
    if len(ranks) != 1:
        raise ValueError(f"LoRA factors of one file share one rank; found ranks {sorted(ranks)}")
    rank = ranks.pop()
    config = {
        "r": rank,
        "lora_alpha": rank if alpha is None else alpha,
        "target_modules": modules,
        "lora_dropout": 0.0,
        "bias": "none",
    }
    metadata = {
        "format": "pt",
        _PEFT_METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in config.items()}),
    }
    from safetensors.torch import save_file

    tensors = {
        f"{prefix}.{k}": torch.as_tensor(v).detach().cpu().contiguous() for k, v in factors.items()
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LORA_WEIGHTS
    partial = out_dir / f".{LORA_WEIGHTS}.{os.getpid()}.partial"
    try:
        save_file(tensors, str(partial), metadata=metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
