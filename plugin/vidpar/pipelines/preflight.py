"""What a job needs from the machine, checked before any work: an output file it can write
(its folder, permissions and room for it) and memory for its tensors.

The memory estimates are rough and on the high side (float32 everywhere, no credit for tp
splitting activations): they catch jobs far out of reach (a video a million pixels wide)
before any worker starts, not the last few percent, so a job near the machine's limit may
be refused although it would have fitted (``VIDPAR_SKIP_MEMORY_CHECK=1`` starts it
anyway). Their terms:

* a transformer block's forward keeps about :data:`BLOCK_ACTIVATIONS` hidden-wide tensors
  per token alive at once (input, norm, q, k, v, attention output, the 4×-wide MLP,
  Ulysses' all-to-all buffers; attention kernels that work in blocks, as SDPA's and
  vidpar's do, keep no full score matrix); training keeps that for every block (one
  block plus one tensor per block with activation checkpointing) and twice it in the
  backward pass;
* weights take 4 bytes a parameter for inference, :data:`TRAIN_BYTES_PER_PARAM` for
  training (weights, gradients, DDP's bucket copy, Adam's two moments);
* on CPU all workers share the machine's available RAM; on GPUs each worker gets its
  device's free memory (``torch.cuda.mem_get_info``).
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from vidpar.config import ParallelConfig

#: Hidden-wide float32 tensors per token that one block's forward keeps alive at once.
BLOCK_ACTIVATIONS = 16
#: Bytes a trained parameter takes: float32 weights, gradients, DDP bucket, Adam's moments.
TRAIN_BYTES_PER_PARAM = 20
FLOAT_BYTES = 4
GIB = 2**30
SKIP_MEMORY_CHECK = "VIDPAR_SKIP_MEMORY_CHECK"


class PreflightError(ValueError):
    """A job the machine cannot run as asked; ``argument`` is the one to change."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


def gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f} GiB"


def check_output_path(path: str | os.PathLike, size_bytes: int, argument: str = "output") -> None:
    """``path`` can be written: its folder exists or is created now, a file can be created
    in it (tried, then removed: permission bits alone do not say, e.g. for root), ``path``
    is not a folder, and that disk has ``size_bytes`` free."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise PreflightError(argument, f"{argument}={path} is a folder; give a file name")
    existing = next(folder for folder in path.parents if folder.exists())
    if not existing.is_dir():
        raise PreflightError(
            argument, f"{argument}={path} cannot be written: {existing} is a file, not a folder"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent, prefix=".vidpar-write-test-"):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "the file is read-only", str(path))
    except OSError as err:
        raise PreflightError(
            argument,
            f"{argument}={path} cannot be written: {err.strerror or err} "
            f"({err.filename or path.parent})",
        ) from None
    free = shutil.disk_usage(path.parent).free
    if free < size_bytes:
        raise PreflightError(
            argument,
            f"{argument}={path} needs about {gib(size_bytes)} (the raw frames, an upper "
            f"bound), but {path.parent} has {gib(free)} free",
        )


def available_memory(device: str) -> tuple[int, str]:
    """``(bytes, what they are)``: the RAM available to all CPU workers together, or the
    least free memory of this machine's GPUs (each worker has one)."""
    if device == "cuda":
        free = min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
        return free, "free on each GPU"
    import psutil

    return psutil.virtual_memory().available, "of RAM available to all workers"


def check_memory(
    per_worker: int, workers: int, device: str, argument: str, what: str, fix: str
) -> None:
    """Raise :class:`PreflightError` when ``workers`` processes of ``per_worker`` bytes each
    (on CPU they share the RAM; on GPUs each has its own) do not fit."""
    if os.environ.get(SKIP_MEMORY_CHECK) == "1":
        return
    have, where = available_memory(device)
    need = per_worker * (workers if device == "cpu" else 1)
    if need > have:
        per = f" ({workers} workers × {gib(per_worker)})" if device == "cpu" and workers > 1 else ""
        raise PreflightError(
            argument,
            f"{what} needs about {gib(need)}{per} by vidpar's conservative estimate, but this "
            f"machine has {gib(have)} {where}. {fix} (or set {SKIP_MEMORY_CHECK}=1 to "
            "start anyway)",
        )


def transformer_bytes(
    batch: int,
    shape: tuple[int, int, int, int],
    patch: tuple[int, int, int],
    hidden: int,
    depth: int,
    parallel: ParallelConfig,
    *,
    training: bool,
    checkpointing: bool,
) -> int:
    """The activations of a transformer of ``depth`` blocks of width ``hidden`` on
    ``batch`` latents of ``shape`` (C, T, H, W) in ``patch``-sized tokens, this worker's
    share of the tokens under ``parallel``'s sequence split, by :data:`BLOCK_ACTIVATIONS`."""
    share = local_share(token_count(shape, patch), parallel.ulysses * parallel.ring)
    block = batch * share * hidden * FLOAT_BYTES * BLOCK_ACTIVATIONS
    if not training:
        return block
    kept = depth * block / BLOCK_ACTIVATIONS if checkpointing else depth * block
    return int(kept + 2 * block)


def token_count(shape: tuple[int, int, int, int], patch: tuple[int, int, int]) -> int:
    """The tokens of latents of ``shape`` (C, T, H, W) in ``patch``-sized pieces."""
    _, t, h, w = shape
    return (t // patch[0]) * (h // patch[1]) * (w // patch[2])


def local_share(total: int, parts: int) -> int:
    return math.ceil(total / max(parts, 1))


def transformer_params(hidden: int, depth: int, ffn: int) -> int:
    """About the parameters of ``depth`` blocks: self- and cross-attention (8 h²) and the
    MLP (2 h · ffn); embeddings and norms are small beside them and left out."""
    return depth * (8 * hidden * hidden + 2 * hidden * ffn)


def generation_bytes(
    transformer: tuple[int, int, int],
    patch: tuple[int, int, int],
    videos: int,
    shape: tuple[int, int, int, int],
    parallel: ParallelConfig,
    guided: bool = True,
) -> int:
    """One worker's memory to sample ``videos`` of ``shape`` ``(C, T, H, W)`` (what the
    transformer takes) under the layout ``parallel`` with a transformer of ``(hidden,
    depth, ffn)`` and ``patch``: the weights, every video's noise, sample, velocity and output (each
    worker draws all of the noise), and one block's activations on its share of the batch
    (dp, cfg) and tokens (sp)."""
    hidden, depth, ffn = transformer
    c, t, h, w = shape
    batch = local_share(local_share(videos, parallel.dp) * (2 if guided else 1), parallel.cfg)
    activations = transformer_bytes(
        batch, shape, patch, hidden, depth, parallel, training=False, checkpointing=False
    )
    return (
        transformer_params(hidden, depth, ffn) * FLOAT_BYTES
        + videos * c * t * h * w * FLOAT_BYTES * 4
        + activations
    )


#: Floats per output pixel that a Wan-like VAE decode keeps alive: four frames at a time,
#: 96 channels at full resolution, a few tensors of them.
VAE_DECODE_FLOATS_PER_PIXEL = 4 * 96 * 4


def decode_bytes(videos: int, frames: int, height: int, width: int) -> int:
    """A VAE decode to ``videos`` of ``frames`` × ``height`` × ``width`` RGB: its working
    set and the float videos it returns."""
    pixels = height * width
    return pixels * VAE_DECODE_FLOATS_PER_PIXEL * FLOAT_BYTES + (
        videos * 3 * frames * pixels * FLOAT_BYTES * 2
    )


def video_file_bytes(videos: int, shape: tuple[int, int, int, int]) -> int:
    """An upper bound of a written video: the raw uint8 RGB frames of all ``videos`` side
    by side, for the ``.mp4`` and the ``.gif`` beside it."""
    _, t, h, w = shape
    return 2 * videos * t * h * w * 3


def check_generation(
    config,
    videos: int,
    shape: tuple[int, int, int, int],
    parallel: ParallelConfig,
    *,
    guided: bool,
    output: str | os.PathLike | None,
    device: str,
) -> None:
    """Before :class:`~vidpar.pipelines.VideoGenerator` (``config``: its DiTConfig)
    samples: ``output`` can be written with room for the video, and the sampling fits the
    memory of ``device`` ("cpu" or "cuda"). Raises :class:`PreflightError`."""
    ffn = config.ffn_dim or int(config.hidden_size * config.mlp_ratio)
    need = generation_bytes(
        (config.hidden_size, config.depth, ffn), config.patch_size, videos, shape, parallel, guided
    )
    _check_job(need, videos, shape[1:], parallel, output=output, device=device)


def diffusers_sizes(config: dict) -> tuple[int, int, int, tuple[int, int, int]]:
    """``(hidden, depth, ffn, patch)`` of a diffusers video transformer's ``config``."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    patch = config["patch_size"]
    if isinstance(patch, int):  # CogVideoX: a spatial size, and patch_size_t (or none)
        patch = (config.get("patch_size_t") or 1, patch, patch)
    return hidden, config["num_layers"], config.get("ffn_dim") or 4 * hidden, tuple(patch)


def check_diffusers_generation(
    config: dict,
    videos: int,
    latent_shape: tuple[int, int, int, int],
    video_size: tuple[int, int, int] | None,
    parallel: ParallelConfig,
    *,
    guided: bool,
    output: str | os.PathLike | None,
    device: str,
) -> None:
    """The same for :class:`~vidpar.pipelines.DiffusersVideoGenerator`: a transformer of
    diffusers ``config`` on latents of ``latent_shape``, then (``video_size``: frames,
    height, width) a VAE decode."""
    *transformer, patch = diffusers_sizes(config)
    need = generation_bytes(tuple(transformer), patch, videos, latent_shape, parallel, guided)
    size = video_size or latent_shape[1:]
    if video_size is not None:
        need += decode_bytes(videos, *video_size)
    _check_job(need, videos, size, parallel, output=output, device=device)


def _check_job(
    need: int,
    videos: int,
    size: tuple[int, int, int],
    parallel: ParallelConfig,
    *,
    output: str | os.PathLike | None,
    device: str,
) -> None:
    t, h, w = size
    if output is not None:
        check_output_path(output, video_file_bytes(videos, (3, t, h, w)))
    check_memory(
        need,
        parallel.world_size,
        device,
        "size",
        f"Generating {videos} video(s) of {t}×{h}×{w} (frames × height × width) with "
        f"{parallel.describe()}",
        "Ask for fewer or smaller videos (num_frames, height, width, labels), or spread "
        "them over more devices (sp, dp)",
    )
