"""DiffusersVideoGenerator: text-to-video with a diffusers video transformer (Wan) and,
optionally, its VAE, on many devices through the Executor."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from vidpar.config import ParallelConfig
from vidpar.distributed import telemetry
from vidpar.distributed.state import get_parallel_state
from vidpar.executor.executor import HEARTBEAT_TIMEOUT_S
from vidpar.models.plan import check_heads
from vidpar.models.pretrained import (
    DiffusersVelocity,
    find_model_folder,
    load_pretrained,
    read_config,
)
from vidpar.pipelines.flow_matching import FlowMatchEulerSampler
from vidpar.pipelines.preflight import check_diffusers_generation
from vidpar.pipelines.video_io import to_uint8_frames, write_video
from vidpar.pipelines.worker_session import WorkerSession

PROMPT, NEGATIVE = "prompt_embeds", "negative_prompt_embeds"
#: Prompt embeddings: ``[L, D]``, ``[B, L, D]``, a list of ``[L_i, D]``, or a safetensors file.
Embeds = torch.Tensor | Sequence[torch.Tensor] | str | os.PathLike


def _build(worker, folder: str, vae_folder: str | None, dtype: torch.dtype):
    """Worker factory: the transformer, prepared for the worker's layout, on its device;
    the first rank of each replica also loads the VAE (as ``worker.vae``)."""
    from vidpar.models import parallelize

    model = load_pretrained(folder, device=worker.device, dtype=dtype)
    model = parallelize(model).eval()
    worker.vae = None
    if vae_folder is not None and get_parallel_state().group("replica").is_first_rank:
        vae_dtype = torch.promote_types(dtype, torch.float32)  # Wan decodes in float32
        worker.vae = load_pretrained(vae_folder, device=worker.device, dtype=vae_dtype).eval()
    return model


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Wan latents (normalised as the transformer sees them) to videos ``[B, 3, F, H, W]``."""
    shape = (1, -1, 1, 1, 1)
    param = next(vae.parameters())
    mean = torch.tensor(vae.config.latents_mean, device=param.device).view(shape)
    std = torch.tensor(vae.config.latents_std, device=param.device).view(shape)
    z = latents.to(param) * std.to(param) + mean.to(param)
    return vae.decode(z, return_dict=False)[0]


def _generate_on_worker(
    worker,
    cond: torch.Tensor,
    null: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    steps: int,
    guidance_scale: float,
    shift: float,
    seed: int,
    decode: bool,
    show_progress: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, list]:
    """Runs on every rank: each dp replica samples its share; its first rank returns
    ``(latents, videos or None, records)`` (records from rank 0 only), the others Nones."""
    share = worker.dp_share(len(cond))
    gen = torch.Generator().manual_seed(seed)
    # All the noise is drawn on every rank, so a video does not depend on the dp layout.
    noise = torch.randn((len(cond), *shape), generator=gen)[share].to(worker.device, dtype)
    if noise.shape[0] == 0:
        return None, None, []
    cond, null = (e[share].to(worker.device, dtype) for e in (cond, null))
    sampler = FlowMatchEulerSampler(num_steps=steps, shift=shift)
    recorder = telemetry.start_recording()
    try:
        with torch.no_grad():
            latents = sampler.sample(
                DiffusersVelocity(worker.model),
                noise,
                cond,
                null,
                guidance_scale,
                show_progress=show_progress,
            )
    finally:
        telemetry.stop_recording()
    if not get_parallel_state().group("replica").is_first_rank:
        return None, None, []
    videos = None
    if decode:
        with torch.no_grad():
            videos = _wide(_decode(worker.vae, latents))
    return _wide(latents), videos, recorder.records if worker.rank == 0 else []


def _wide(x: torch.Tensor) -> torch.Tensor:
    """On the CPU in float32 or wider (float64 results stay float64)."""
    return x.to("cpu", torch.promote_types(x.dtype, torch.float32))


def _as_batch(embeds: torch.Tensor | Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
    if isinstance(embeds, torch.Tensor):
        if embeds.dim() == 2:
            return [embeds]
        if embeds.dim() == 3:
            return list(embeds.unbind(0))
    elif all(isinstance(e, torch.Tensor) and e.dim() == 2 for e in embeds):
        return list(embeds)
    raise ValueError(f"{what} must be [L, D], [B, L, D] or a list of [L, D] tensors")


def read_prompt_file(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``prompt_embeds`` and (if there) ``negative_prompt_embeds`` of a safetensors file
    (a sample of a latents folder is one)."""
    from safetensors.torch import load_file

    tensors = load_file(os.fspath(path))
    if PROMPT not in tensors:
        raise ValueError(f"{path} has no {PROMPT!r} tensor (it has {sorted(tensors)})")
    return tensors[PROMPT], tensors.get(NEGATIVE)


def _as_adapter(
    source: str | os.PathLike | Mapping[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """A vidpar LoRA adapter from a diffusers/PEFT LoRA or a vidpar adapter."""
    from vidpar.nn.lora import load_adapter
    from vidpar.nn.lora_peft import peft_to_adapter

    state = load_adapter(source)
    if any(k.endswith((".lora_A.weight", ".lora_down.weight")) for k in state):
        return peft_to_adapter(source if not isinstance(source, Mapping) else state, scale=scale)
    if scale != 1.0:
        state["scale"] = state.get("scale", torch.tensor(1.0, dtype=torch.float64)) * scale
    return state


def _padded(items: list[torch.Tensor], length: int) -> torch.Tensor:
    out = torch.zeros(len(items), length, items[0].shape[-1], dtype=torch.float64)
    for i, item in enumerate(items):
        out[i, : len(item)] = item
    return out


class DiffusersVideoGenerator(WorkerSession):
    """Text-to-video with a diffusers video transformer from a local folder, with the
    layout of ``parallel``, through an :class:`~vidpar.executor.Executor`.

    Each worker loads the transformer (``path``: a model folder, or a pipeline folder with
    ``transformer/``) in ``dtype`` and prepares it with :func:`vidpar.models.parallelize`:
    sp and tp shard it, ``cfg=2`` runs the conditional and unconditional passes on
    different ranks, ``dp > 1`` splits the videos between replicas. With ``vae`` (an
    ``AutoencoderKLWan`` folder, or a pipeline folder with ``vae/``) the first rank of each
    replica decodes the latents to videos. Sampling is :class:`FlowMatchEulerSampler` with
    Wan's timestep convention (``1000 t``) and schedule ``shift``. The same seed gives the
    same latents on every layout. A worker silent for ``heartbeat_timeout_s`` (as the
    :class:`~vidpar.executor.Executor`'s) fails the call. Use as a context manager, or call
    :meth:`close`. For a whole pipeline folder and text prompts, sampled with the folder's
    own scheduler as diffusers samples, use :class:`~vidpar.pipelines.DiffusersPipelineGenerator`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        parallel: ParallelConfig | None = None,
        vae: str | os.PathLike | None = None,
        subfolder: str | None = None,
        dtype: torch.dtype = torch.float32,
        devices: str | list[str] = "auto",
        heartbeat_timeout_s: float | None = HEARTBEAT_TIMEOUT_S,
    ) -> None:
        self.folder = find_model_folder(path, subfolder)
        self.config = read_config(self.folder)
        self.vae_folder = None if vae is None else find_model_folder(vae, None, "vae")
        self.vae_config = None if self.vae_folder is None else read_config(self.vae_folder)
        self.dtype = dtype
        parallel = parallel or ParallelConfig()
        check_heads(parallel, self.config["num_attention_heads"])
        factory = functools.partial(
            _build,
            folder=str(self.folder),
            vae_folder=None if self.vae_folder is None else str(self.vae_folder),
            dtype=dtype,
        )
        super().__init__(parallel, factory, devices, heartbeat_timeout_s)

    def _embeds(self, prompt: Embeds, negative: Embeds | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt and negative embeddings as ``[B, L, D]``, zero-padded to one length."""
        if isinstance(prompt, str | os.PathLike):
            prompt, from_file = read_prompt_file(prompt)
            negative = from_file if negative is None else negative
        if isinstance(negative, str | os.PathLike):
            negative = read_prompt_file(negative)[0]
        cond = _as_batch(prompt, PROMPT)
        null = _as_batch(negative, NEGATIVE) if negative is not None else None
        if null is not None and len(null) == 1 < len(cond):
            null = null * len(cond)
        if null is not None and len(null) != len(cond):
            raise ValueError(f"{len(cond)} prompts but {len(null)} negative prompts")
        dim = self.config["text_dim"]
        if any(e.shape[-1] != dim for e in cond + (null or [])):
            raise ValueError(f"prompt embeddings must be [L, {dim}] (the model's text_dim)")
        length = max(len(e) for e in cond + (null or []))
        null_batch = _padded(null, length) if null else torch.zeros(len(cond), length, dim)
        return _padded(cond, length), null_batch.to(torch.float64)

    def _latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The latent grid for a video of that size (with a VAE) or of that latent size."""
        size = (num_frames, height, width)
        if self.vae_config is not None:
            st = self.vae_config.get("scale_factor_temporal", 4)
            ss = self.vae_config.get("scale_factor_spatial", 8)
            if (num_frames - 1) % st or height % ss or width % ss:
                raise ValueError(
                    f"video size (num_frames, height, width) = {size} does not map onto "
                    f"latents: the VAE needs num_frames = 1 + {st}·k and height, width "
                    f"divisible by {ss}"
                )
            size = ((num_frames - 1) // st + 1, height // ss, width // ss)
        patch = tuple(self.config["patch_size"])
        if any(s < 1 or s % p for s, p in zip(size, patch, strict=True)):
            raise ValueError(
                f"latent size {size} is not a positive multiple of the patch size {patch}"
            )
        return size

    def generate(
        self,
        prompt_embeds: Embeds,
        negative_prompt_embeds: Embeds | None = None,
        num_frames: int = 1,
        height: int = 16,
        width: int = 16,
        steps: int = 30,
        guidance_scale: float = 5.0,
        shift: float = 3.0,
        seed: int = 0,
        output: str | os.PathLike | None = None,
        fps: int = 16,
        output_type: Literal["uint8", "float", "latent"] = "uint8",
        show_progress: bool = True,
    ) -> np.ndarray | torch.Tensor:
        """One video per prompt from the noise of ``seed``.

        ``prompt_embeds``: ``[L, D]``, ``[B, L, D]``, a list of ``[L_i, D]`` (padded with
        zeros to the longest), or a safetensors file holding ``prompt_embeds`` (and maybe
        ``negative_prompt_embeds``, used unless given). No negative prompt: zeros.
        ``num_frames``, ``height``, ``width`` are the video's size with a VAE (Wan: 81, 480,
        832) and the latents' size without. Returns uint8 frames ``[B, F, H, W, 3]`` (or
        float videos ``[B, 3, F, H, W]`` in about [-1, 1] with ``output_type="float"``) with
        a VAE; the latents ``[B, C, T, H, W]`` without one or with ``output_type="latent"``
        (float tensors in float32, or float64 for a float64 model).
        ``output`` (``.mp4``, ``.gif``; needs a VAE) gets the videos side by side.
        """
        if output_type not in ("uint8", "float", "latent"):
            raise ValueError(
                f"output_type must be 'uint8', 'float' or 'latent', got {output_type!r}"
            )
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        decode = self.vae_folder is not None and output_type != "latent"
        if output is not None and self.vae_folder is None:
            raise ValueError("writing a video needs a VAE: pass vae=<AutoencoderKLWan folder>")
        cond, null = self._embeds(prompt_embeds, negative_prompt_embeds)
        shape = (self.config["in_channels"], *self._latent_size(num_frames, height, width))
        check_diffusers_generation(  # the output path and memory, before the workers sample
            self.config,
            len(cond),
            shape,
            (num_frames, height, width) if decode else None,
            self.parallel,
            guided=guidance_scale != 1.0,
            output=output,
            device=self.device_type,
        )
        results = self.executor.collective_rpc(
            _generate_on_worker,
            cond,
            null,
            shape,
            self.dtype,
            steps,
            guidance_scale,
            shift,
            seed,
            decode,
            show_progress,
        )
        self.last_records = results[0][2]
        leaders = self.replica_leaders(results)
        latents = torch.cat([r[0] for r in leaders if r[0] is not None])
        if not decode:
            return latents
        videos = torch.cat([r[1] for r in leaders if r[1] is not None])
        frames = np.stack([to_uint8_frames(v) for v in videos])
        if output is not None:
            write_video(output, np.concatenate(list(frames), axis=2), fps=fps)
        return videos if output_type == "float" else frames

    # LoRA -------------------------------------------------------------------------------

    def set_lora_adapter(
        self,
        name: str,
        path_or_state: str | os.PathLike | Mapping[str, torch.Tensor],
        scale: float = 1.0,
    ) -> list[str]:
        """Load adapter ``name`` into every worker; returns the weights it targets.

        A LoRA in the diffusers/PEFT layout (``<module>.lora_A.weight``, as diffusers'
        ``save_lora_weights`` and PEFT write Wan LoRAs; kohya's ``lora_down``/``lora_up``
        too) is converted by :func:`vidpar.nn.lora_peft.peft_to_adapter` (its alpha applied,
        merged with strength ``scale``); a vidpar adapter (:mod:`vidpar.nn.lora`) is taken
        as it is. The file is read once, here; the tp-aware merge runs in the workers.
        """
        adapter = _as_adapter(path_or_state, scale)
        return self.executor.collective_rpc("set_lora_adapter", name, adapter)[0]
