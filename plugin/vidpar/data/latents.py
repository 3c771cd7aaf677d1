"""Precomputed latents and text embeddings on disk: a folder of ``.safetensors`` files.

The format (version 1)::

    latents/
      dataset.json          optional: {"format": "vidpar-latents", "version": 1,
                            "latent_shape": [C, T, H, W], "text_len": L, "text_dim": D,
                            "samples": [{"file": "000000.safetensors", "prompt": "..."}, ...]}
      000000.safetensors    one sample per file:
                              latents                 [C, T, H, W]  what the transformer takes
                              prompt_embeds           [L_i, D]      the text encoder's output
                              negative_prompt_embeds  [L_j, D]      optional
      000001.safetensors
      ...

``latents`` are what the transformer denoises: for Wan, the VAE's latent mean normalised
with the VAE config's ``latents_mean`` / ``latents_std``, ``(z - mean) / std``, as
``WanPipeline`` hands them to the transformer. ``prompt_embeds`` are the text encoder's
hidden states (for Wan, umT5's, as ``WanPipeline.encode_prompt`` returns them). Every
sample has the same latent shape; prompts may differ in length and are padded with zeros
to ``text_len`` (the longest in the folder unless ``dataset.json`` says more), as Wan pads
its prompts. A sample without ``negative_prompt_embeds`` gets zeros: that is the
unconditional input for classifier-free-guidance dropout in training.

Without ``dataset.json`` the samples are every ``*.safetensors`` file of the folder in name
order; with it, its ``samples`` list (the ``prompt`` texts are kept as metadata).
:func:`write_latents_folder` writes a folder, :class:`LatentsDataset` reads one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

FORMAT = "vidpar-latents"
VERSION = 1
INDEX_FILE = "dataset.json"
LATENTS, PROMPT, NEGATIVE = "latents", "prompt_embeds", "negative_prompt_embeds"

Tensors = torch.Tensor | Sequence[torch.Tensor]


def _as_list(tensors: Tensors, name: str, rank: int) -> list[torch.Tensor]:
    items = list(tensors.unbind(0) if isinstance(tensors, torch.Tensor) else tensors)
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor) or item.dim() != rank:
            shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise ValueError(f"{name}[{i}] must be a {rank}-D tensor, got {shape}")
    return items


def write_latents_folder(
    path: str | os.PathLike,
    latents: Tensors,
    prompt_embeds: Tensors,
    negative_prompt_embeds: Tensors | None = None,
    prompts: Sequence[str] | None = None,
) -> Path:
    """Write one ``NNNNNN.safetensors`` per sample and ``dataset.json`` into ``path``.

    ``latents`` is ``[N, C, T, H, W]`` or N tensors ``[C, T, H, W]`` (all one shape);
    ``prompt_embeds`` (and ``negative_prompt_embeds``) ``[N, L, D]`` or N tensors ``[L_i, D]``
    with one ``D``. Tensors are stored in their own dtype. ``path`` must not hold a dataset
    already. Returns ``path``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    lat = _as_list(latents, LATENTS, 4)
    text = _as_list(prompt_embeds, PROMPT, 2)
    negative = (
        None if negative_prompt_embeds is None else _as_list(negative_prompt_embeds, NEGATIVE, 2)
    )
    counts = {LATENTS: len(lat), PROMPT: len(text)}
    if negative is not None:
        counts[NEGATIVE] = len(negative)
    if prompts is not None:
        counts["prompts"] = len(prompts)
    if len(set(counts.values())) != 1 or not lat:
        raise ValueError(f"give the same positive number of each: {counts}")
    if len({tuple(x.shape) for x in lat}) != 1:
        raise ValueError(f"latents differ in shape: {sorted({tuple(x.shape) for x in lat})}")
    dims = {e.shape[1] for e in text + (negative or [])}
    if len(dims) != 1:
        raise ValueError(f"text embeddings differ in width D: {sorted(dims)}")
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} is not empty: write a latents folder into a new one")
    path.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(len(lat)):
        name = f"{i:06d}.safetensors"
        tensors = {LATENTS: lat[i], PROMPT: text[i]}
        if negative is not None:
            tensors[NEGATIVE] = negative[i]
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path / name))
        samples.append({"file": name, **({"prompt": prompts[i]} if prompts is not None else {})})
    index = {
        "format": FORMAT,
        "version": VERSION,
        "latent_shape": list(lat[0].shape),
        "text_len": max(e.shape[0] for e in text + (negative or [])),
        "text_dim": dims.pop(),
        "samples": samples,
    }
    (path / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    return path


def _check_inside(index_file: Path, name: object) -> None:
    """A sample's ``file`` entry must name a file inside the folder of ``index_file``."""
    relative = isinstance(name, str) and name and not Path(name).is_absolute()
    if not relative or ".." in Path(name).parts:
        raise ValueError(
            f"{index_file} lists the sample file {name!r}, which is not inside its folder: "
            "entries must be paths relative to the folder, without '..'. Fix the entry, or "
            "write the folder with vidpar.data.write_latents_folder."
        )


def _shapes(file: Path) -> dict[str, list[int]]:
    """The tensors' shapes in a safetensors file, read from its header only."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


class LatentsDataset(Dataset):
    """The samples of a latents folder (see the module docstring for the format).

    Item ``i`` is ``{"latents": [C, T, H, W], "prompt_embeds": [text_len, D],
    "negative_prompt_embeds": [text_len, D], "index": i}`` in float32. ``indices`` picks a
    subset (in that order) of the folder's samples; ``index`` counts within the subset.
    """

    def __init__(self, path: str | os.PathLike, indices: Sequence[int] | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"latents folder {self.path} does not exist: make one with "
                "vidpar.data.write_latents_folder (format: vidpar.data.latents)"
            )
        index = self._read_index()
        names = [s["file"] for s in index["samples"]] if "samples" in index else None
        for name in names or ():
            _check_inside(self.path / INDEX_FILE, name)
        if names is None:
            names = sorted(p.name for p in self.path.glob("*.safetensors"))
        files = [self.path / n for n in names]
        if not files:
            raise ValueError(f"{self.path} holds no .safetensors samples")
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.path / INDEX_FILE} lists missing files {missing[:3]}")
        self.prompts = [s.get("prompt") for s in index.get("samples", [])] or [None] * len(files)
        first = _shapes(files[0])
        for key in (LATENTS, PROMPT):
            if key not in first:
                raise ValueError(f"{files[0]} has no {key!r} tensor (it has {sorted(first)})")
        self.latent_shape = tuple(index.get("latent_shape", first[LATENTS]))
        self.text_dim = int(index.get("text_dim", first[PROMPT][1]))
        if "text_len" in index:
            self.text_len = int(index["text_len"])
        else:  # read every header once: the longest prompt sets the padded length
            self.text_len = max(
                shape[0] for f in files for k, shape in _shapes(f).items() if k != LATENTS
            )
        chosen = range(len(files)) if indices is None else list(indices)
        self.files = [files[i] for i in chosen]
        self.prompts = [self.prompts[i] for i in chosen]

    def _read_index(self) -> dict[str, Any]:
        file = self.path / INDEX_FILE
        if not file.is_file():
            return {}
        index = json.loads(file.read_text())
        if index.get("format") != FORMAT or index.get("version", VERSION) > VERSION:
            raise ValueError(
                f"{file} is not a {FORMAT} index of version <= {VERSION} "
                f"(format {index.get('format')!r}, version {index.get('version')!r})"
            )
        return index

    def __len__(self) -> int:
        return len(self.files)

    def _padded(self, embeds: torch.Tensor | None, file: Path, key: str) -> torch.Tensor:
        out = torch.zeros(self.text_len, self.text_dim)
        if embeds is None:
            return out
        if embeds.dim() != 2 or embeds.shape[1] != self.text_dim or len(embeds) > self.text_len:
            raise ValueError(
                f"{file}: {key} has shape {tuple(embeds.shape)}, expected [L <= {self.text_len}, "
                f"{self.text_dim}]"
            )
        out[: len(embeds)] = embeds.float()
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        from safetensors.torch import load_file

        file = self.files[index]
        tensors = load_file(str(file))
        latents = tensors[LATENTS]
        if tuple(latents.shape) != self.latent_shape:
            raise ValueError(
                f"{file}: latents have shape {tuple(latents.shape)}, but the folder's samples "
                f"are {self.latent_shape}"
            )
        return {
            LATENTS: latents.float(),
            PROMPT: self._padded(tensors[PROMPT], file, PROMPT),
            NEGATIVE: self._padded(tensors.get(NEGATIVE), file, NEGATIVE),
            "index": index,
        }

    def __repr__(self) -> str:
        return (
            f"LatentsDataset({str(self.path)!r}, {len(self)} samples, latents "
            f"{list(self.latent_shape)}, text {self.text_len}×{self.text_dim})"
        )
