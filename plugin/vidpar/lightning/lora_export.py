"""``export_lora``: the adapters of a LoRA checkpoint as a diffusers LoRA file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from vidpar.nn.lora_peft import check_output_folder, save_peft_lora

__all__ = ["export_lora"]


def export_lora(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the adapters of a sharded :class:`~vidpar.lightning.DiffusersFlowModule`
    checkpoint trained with ``lora`` (any layout) as ``out_dir/pytorch_lora_weights.safetensors``
    in diffusers' layout (:func:`vidpar.nn.lora_peft.save_peft_lora`: full factors, the
    run's rank and alpha in the header), which diffusers' ``load_lora_weights`` and vidpar's
    ``set_lora_adapter`` load. Returns the file.

    ``out_dir`` must be missing or empty: checked first, nothing is overwritten. Runs in
    one process."""
    from safetensors.torch import load_file

    from vidpar.distributed.full_weights import export_full_checkpoint, read_hyper_parameters

    out = check_output_folder(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        full = export_full_checkpoint(ckpt_dir, Path(tmp) / "adapters.safetensors", "model.")
        hparams = read_hyper_parameters(full) or {}
        tensors = load_file(str(full))
    lora = hparams.get("lora")
    if not lora:
        raise ValueError(
            f"{ckpt_dir} was not trained with LoRA (no model.lora in its hyper-parameters): "
            "export its full weights with vidpar.lightning.export_diffusers"
        )
    factors = {k: v for k, v in tensors.items() if k.endswith((".lora_A.weight", ".lora_B.weight"))}
    return save_peft_lora(factors, out, alpha=lora.get("alpha"))
