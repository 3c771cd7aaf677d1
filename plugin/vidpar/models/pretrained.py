"""Local diffusers model folders: find the model in one, load it, call it as a flow velocity.

A folder is a diffusers *model* folder (``config.json`` naming its ``_class_name``, and
``diffusion_pytorch_model.safetensors`` or a sharded ``...safetensors.index.json``), or a
*pipeline* folder (``model_index.json``) whose ``transformer/`` or ``vae/`` subfolder is
one. Nothing is downloaded. Weights are read with safetensors directly, so loading needs
neither ``accelerate`` (which diffusers' ``from_pretrained`` needs for Wan) nor a network.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = WEIGHTS + ".index.json"
#: The factor from vidpar's flow time ``t`` in [0, 1] to diffusers' timestep (Wan's
#: schedulers use ``num_train_timesteps=1000``: timestep = 1000 · sigma).
TIMESTEP_SCALE = 1000.0


def find_model_folder(
    path: str | os.PathLike, subfolder: str | None = None, default_subfolder: str = "transformer"
) -> Path:
    """The folder holding the model's ``config.json``: ``path/subfolder`` when
    ``subfolder`` is given, else ``path`` itself or ``path/default_subfolder``."""
    if path is None or str(path) in ("", "???"):
        raise ValueError(
            "no model path given: pass the local diffusers folder of the model (for "
            "vidpar-train: model.path=/path/to/Wan2.1-T2V-1.3B-Diffusers)"
        )
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"model path {root} is not a directory: give a local diffusers folder (a model "
            f"folder with config.json, or a pipeline folder with {default_subfolder}/); "
            "nothing is downloaded"
        )
    candidates = [root / subfolder] if subfolder else [root, root / default_subfolder]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    looked = " or ".join(str(c / "config.json") for c in candidates)
    raise FileNotFoundError(
        f"{root} is not a diffusers folder: there is no {looked}. Give a model folder "
        f"written by save_pretrained, or a pipeline folder with a {default_subfolder}/ "
        "subfolder (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)"
    )


def read_config(folder: Path) -> dict[str, Any]:
    """A model folder's ``config.json``; it must name a diffusers class."""
    config = json.loads((folder / "config.json").read_text())
    if "_class_name" not in config:
        raise ValueError(f"{folder / 'config.json'} has no _class_name: not a diffusers model")
    return config


def _weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / WEIGHTS_INDEX).is_file():
        weight_map = json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    raise FileNotFoundError(
        f"{folder} has no {WEIGHTS} (or {WEIGHTS_INDEX}): vidpar reads safetensors weights "
        "(re-save a .bin model with save_pretrained(safe_serialization=True))"
    )


def model_class(config: dict[str, Any]) -> type[nn.Module]:
    import diffusers

    cls = getattr(diffusers, config["_class_name"], None)
    if cls is None:
        raise ValueError(f"diffusers {diffusers.__version__} has no class {config['_class_name']}")
    return cls


def load_pretrained(
    path: str | os.PathLike,
    subfolder: str | None = None,
    default_subfolder: str = "transformer",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The diffusers model of a local folder, with its weights, in training mode.

    The model is built from its config with the current default dtype and device (so under
    Lightning's ``configure_model`` it is born on the strategy's device and precision), then
    moved to ``device`` and ``dtype`` if given (a half-precision ``dtype`` keeps the modules
    the class lists in ``_keep_in_fp32_modules`` in float32, as ``from_pretrained(
    torch_dtype=...)`` does); the weights are copied in (every weight must be in the files;
    extras that the class declares ignorable are skipped).
    """
    from safetensors.torch import load_file

    folder = find_model_folder(path, subfolder, default_subfolder)
    config = read_config(folder)
    cls = model_class(config)
    model = cls.from_config(config)
    if dtype is not None:
        _cast(model, dtype)
    if device is not None:
        model.to(device)
    ignorable = [
        re.compile(p) for p in getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []
    ]
    expected = model.state_dict()
    loaded: set[str] = set()
    for file in _weight_files(folder):
        state = load_file(str(file))
        unexpected = [
            k for k in state if k not in expected and not any(p.search(k) for p in ignorable)
        ]
        if unexpected:
            raise ValueError(
                f"{file} holds weights that {cls.__name__} with this config does not have: "
                f"{unexpected[:5]}"
            )
        state = {k: v for k, v in state.items() if k in expected}
        model.load_state_dict(state, strict=False)
        loaded.update(state)
        del state
    missing = sorted(set(expected) - loaded)
    if missing:
        raise ValueError(f"{folder} lacks weights of {cls.__name__}: {missing[:5]}")
    return model.train()


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating-point parameters and buffers to ``dtype``, but those of the class's
    ``_keep_in_fp32_modules`` stay float32 when ``dtype`` is narrower."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    narrow = torch.finfo(dtype).bits < 32
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            fp32 = narrow and any(part in keep for part in name.split("."))
            tensor.data = tensor.data.to(torch.float32 if fp32 else dtype)


class DiffusersVelocity:
    """A diffusers video transformer as vidpar's velocity function ``v(x_t, t, cond)``:
    ``model(x_t, timestep_scale · t, cond, return_dict=False)[0]``, with ``t`` in [0, 1]
    (noise at 1) and ``cond`` the prompt embeddings ``[B, L, D]``.

    diffusers' flow-matching video models (Wan among them) predict ``noise - x0``, the
    velocity of vidpar's convention, so nothing else changes.
    """

    def __init__(self, model: nn.Module, timestep_scale: float = TIMESTEP_SCALE) -> None:
        self.model = model
        self.timestep_scale = timestep_scale

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # The timestep stays in t's dtype (float32 or wider): 1000·t in bf16 would be coarse.
        return self.model(x, t * self.timestep_scale, cond.to(x.dtype), return_dict=False)[0]
