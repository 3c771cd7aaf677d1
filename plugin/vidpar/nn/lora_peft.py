"""LoRA files in diffusers' PEFT layout, the format the ecosystem loads.

:func:`save_peft_lora` writes ``pytorch_lora_weights.safetensors`` as diffusers'
``save_lora_weights`` does (keys ``transformer.<module>.lora_A.weight``, the LoraConfig in the
header), which diffusers' ``load_lora_weights``, PEFT and vidpar's ``set_lora_adapter``
(:func:`vidpar.nn.lora.peft_to_adapter`) read; :func:`adapter_to_peft` turns a vidpar adapter
(:mod:`vidpar.nn.lora`'s own format) into such factors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from vidpar.nn.lora import _A, _B, _PEFT_METADATA_KEY, _SCALE, adapter_targets, load_adapter

__all__ = ["LORA_WEIGHTS", "adapter_to_peft", "check_output_folder", "save_peft_lora"]

#: The file name diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` reads.
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
_PEFT_A, _PEFT_B = ".lora_A.weight", ".lora_B.weight"


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
