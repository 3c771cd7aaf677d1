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

import copy
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


#: safetensors dtype names of the floating-point tensors a latents file may hold.
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


class LatentsFileError(ValueError):
    """A latents folder's file that cannot be trained on; the message names the file."""


def read_header(file: Path) -> dict[str, tuple[str, list[int]]]:
    """``{key: (dtype, shape)}`` of a safetensors file, from its header only. A truncated
    or unreadable file (the header's sizes do not cover the file) raises
    :class:`LatentsFileError` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {
                k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape()))
                for k in f.keys()  # noqa: SIM118
            }
    except Exception as err:  # SafetensorError, OSError: a damaged or unreadable file
        raise LatentsFileError(
            f"{file} is not a readable safetensors file ({err}): it may be truncated or "
            "damaged; write it again (vidpar.data.write_latents_folder) or remove it from the "
            "folder"
        ) from None


def _check_tensor(file: Path, key: str, entry: tuple[str, list[int]] | None, rank: int) -> None:
    if entry is None:
        return
    dtype, shape = entry
    layout = "[C, T, H, W]" if rank == 4 else "[L, D]"
    if len(shape) != rank or 0 in shape:
        raise LatentsFileError(f"{file}: {key} has shape {shape}, expected {layout}")
    if dtype not in FLOAT_DTYPES:
        raise LatentsFileError(
            f"{file}: {key} is {dtype}, expected a floating-point tensor "
            f"({', '.join(sorted(FLOAT_DTYPES))})"
        )


def check_sample_files(
    files: Sequence[Path], index: dict[str, Any]
) -> tuple[tuple[int, ...], int, int]:
    """Every sample file's header: ``latents`` [C, T, H, W] of one shape, ``prompt_embeds``
    (and optional ``negative_prompt_embeds``) [L, D] of one width, all floating point and
    within what ``dataset.json`` says. Returns ``(latent_shape, text_len, text_dim)``;
    raises :class:`LatentsFileError` naming the first file that differs."""
    index_file = files[0].parent / INDEX_FILE
    latent_shape = tuple(index["latent_shape"]) if "latent_shape" in index else None
    shape_source = f"{index_file}'s latent_shape"
    text_dim = int(index["text_dim"]) if "text_dim" in index else None
    text_len = 0
    for file in files:
        header = read_header(file)
        for key in (LATENTS, PROMPT):
            if key not in header:
                raise LatentsFileError(
                    f"{file} has no {key!r} tensor (it has {sorted(header)}): every sample "
                    f"needs {LATENTS!r} [C, T, H, W] and {PROMPT!r} [L, D]"
                )
        _check_tensor(file, LATENTS, header[LATENTS], 4)
        shape = tuple(header[LATENTS][1])
        if latent_shape is None:
            latent_shape, shape_source = shape, f"{file}'s"
        elif shape != latent_shape:
            raise LatentsFileError(
                f"{file}: latents have shape {list(shape)}, but {shape_source} are "
                f"{list(latent_shape)}: every sample of a folder has one latent shape"
            )
        for key in (PROMPT, NEGATIVE):
            _check_tensor(file, key, header.get(key), 2)
            if key not in header:
                continue
            length, width = header[key][1]
            if text_dim is None:
                text_dim = width
            elif width != text_dim:
                raise LatentsFileError(
                    f"{file}: {key} has width D={width}, but the folder's text embeddings "
                    f"have D={text_dim}"
                )
            text_len = max(text_len, length)
    if "text_len" in index:
        if text_len > int(index["text_len"]):
            raise LatentsFileError(
                f"{index_file} says text_len={index['text_len']}, but a "
                f"sample's prompt has {text_len} tokens: set text_len to at least {text_len}"
            )
        text_len = int(index["text_len"])
    return latent_shape, text_len, text_dim


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
        # Every file's header now (a fast read), so no bad file surfaces mid-training.
        self.latent_shape, self.text_len, self.text_dim = check_sample_files(files, index)
        chosen = range(len(files)) if indices is None else list(indices)
        self.files = [files[i] for i in chosen]
        self.prompts = [self.prompts[i] for i in chosen]

    def subset(self, indices: Sequence[int]) -> LatentsDataset:
        """The samples ``indices`` of this dataset, without reading the folder again."""
        subset = copy.copy(self)
        subset.files = [self.files[i] for i in indices]
        subset.prompts = [self.prompts[i] for i in indices]
        return subset

    def check_model(self, in_channels: int, text_dim: int | None, model: str) -> None:
        """Raise :class:`LatentsFileError` unless the samples are what ``model`` (named in
        the message) takes: ``in_channels`` latent channels and ``text_dim``-wide prompts."""
        if self.latent_shape[0] != in_channels:
            raise LatentsFileError(
                f"{self.files[0] if self.files else self.path}: latents have "
                f"{self.latent_shape[0]} channels (shape {list(self.latent_shape)}), but "
                f"{model} takes in_channels={in_channels}: use latents encoded for this model"
            )
        if text_dim is not None and self.text_dim != text_dim:
            raise LatentsFileError(
                f"{self.files[0] if self.files else self.path}: prompt_embeds are "
                f"{self.text_dim} wide, but {model} takes text_dim={text_dim}: use the "
                "embeddings of this model's text encoder"
            )

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
