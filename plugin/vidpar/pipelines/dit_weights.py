"""A VideoDiT's weights file: one safetensors file with the DiT config and the training
data's facts in its header, written, read back, or exported from a vidpar checkpoint
directory (signed, checked) for sampling."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vidpar.distributed.full_weights import HPARAMS_KEY, read_hyper_parameters, save_full_weights
from vidpar.nn.dit import DiTConfig, VideoDiT

#: The training-data facts a checkpoint may record beside the DiT config.
DATA_INFO_FIELDS = ("class_names", "video_shape")


def export_weights(
    model: VideoDiT, path: str | Path, data_info: dict[str, Any] | None = None
) -> Path:
    """Save a VideoDiT as one full safetensors file with its config (and ``data_info``:
    ``class_names``, ``video_shape``) in the header, as :func:`export_full_checkpoint
    <vidpar.distributed.full_weights.export_full_checkpoint>` writes a trained run's. A
    tp-sharded model is gathered first: then every rank of its tp group must call this,
    and global rank 0 writes."""
    hparams = {"dit": asdict(model.config), **(data_info or {})}
    return save_full_weights(model, path, metadata={HPARAMS_KEY: json.dumps(hparams)})


def checkpoint_weights(path: str | Path, trust: bool = False) -> Path:
    """The safetensors file of a checkpoint: ``path`` itself, or for a vidpar checkpoint
    directory its export (see
    :meth:`~vidpar.pipelines.generator.VideoGenerator.from_checkpoint`)."""
    path = Path(path)
    if path.is_dir():
        path = _export_from_directory(path, trust)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist: give a .safetensors file or a vidpar "
            "checkpoint directory (checkpoints/last.ckpt of a vidpar-train run)"
        )
    if path.suffix != ".safetensors":
        raise ValueError(
            f"checkpoint {path} is not a .safetensors file: export it with "
            "vidpar.pipelines.export_weights or vidpar.lightning.export_full_checkpoint"
        )
    return path


def read_model_info(path: str | Path) -> tuple[DiTConfig, dict[str, Any]]:
    """The DiT config and training-data facts stored in a safetensors file's header."""
    hparams = read_hyper_parameters(path)
    if hparams is None or "dit" not in hparams:
        raise ValueError(
            f"{path} records no DiT config: write it with vidpar.pipelines.export_weights or "
            "vidpar.lightning.export_full_checkpoint (a checkpoint of VideoDiffusionModule), "
            "or pass the checkpoints/last.ckpt directory of a vidpar-train run"
        )
    data_info = {k: hparams[k] for k in DATA_INFO_FIELDS if hparams.get(k) is not None}
    return DiTConfig.from_saved(hparams["dit"]), data_info


def export_cache_dir() -> Path:
    """Where checkpoint directories are exported for sampling: ``$XDG_CACHE_HOME/vidpar/
    exports`` (default ``~/.cache/vidpar/exports``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vidpar" / "exports"


def _export_from_directory(ckpt_dir: Path, trust: bool = False) -> Path:
    """A vidpar checkpoint directory (resolved to its current version, its files checked
    against the signed manifest of its save) exported once into :func:`export_cache_dir`
    (named by the version's path and manifest, so a new save exports anew), from the EMA
    weights when it has them. Nothing is written beside the checkpoint."""
    import hashlib

    from vidpar.distributed.checkpoint_integrity import MANIFEST, verify
    from vidpar.distributed.checkpoint_store import TRAINER_STATE, resolve
    from vidpar.distributed.full_weights import export_full_checkpoint

    resolved = resolve(ckpt_dir)
    if resolved is None:
        raise FileNotFoundError(
            f"{ckpt_dir} is not a complete vidpar checkpoint (no {TRAINER_STATE} or DCP "
            "metadata; was its save interrupted?): give checkpoints/last.ckpt of a finished "
            "vidpar-train run, or a .safetensors file"
        )
    verify(resolved, trust=trust)  # before anything of it is read
    identity = hashlib.sha256(str(resolved).encode())
    for name in (MANIFEST, TRAINER_STATE):
        if (resolved / name).is_file():
            identity.update((resolved / name).read_bytes())
    out = export_cache_dir() / f"{identity.hexdigest()[:32]}.safetensors"
    if not out.is_file():
        export_full_checkpoint(resolved, out, trust=trust)
    return out
