"""VideoGenerator: sample videos from a VideoDiT on many devices through the Executor."""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vidpar.config import ParallelConfig
from vidpar.distributed import telemetry
from vidpar.executor.executor import HEARTBEAT_TIMEOUT_S
from vidpar.nn.dit import DiTConfig, VideoDiT
from vidpar.pipelines.dit_weights import checkpoint_weights, read_model_info
from vidpar.pipelines.flow_matching import FlowMatchEulerSampler
from vidpar.pipelines.preflight import check_generation
from vidpar.pipelines.video_io import VIDEO_EXTENSIONS, to_uint8_frames, write_video
from vidpar.pipelines.worker_session import WorkerSession


def _build_dit(worker, config: dict[str, Any]) -> VideoDiT:
    """Worker factory: the DiT, sharded for the worker's layout, on its device."""
    return VideoDiT(DiTConfig(**config)).to(worker.device).eval()


def _generate_on_worker(
    worker,
    labels: list[int],
    shape: tuple[int, ...],
    steps: int,
    guidance_scale: float,
    seed: int,
    show_progress: bool,
) -> tuple[torch.Tensor | None, list]:
    """Runs on every rank. Each dp replica samples its share of the videos; the first rank
    of each replica returns them (rank 0 also its collective records), the others
    ``(None, [])``."""
    model: VideoDiT = worker.model
    share = worker.dp_share(len(labels))
    gen = torch.Generator().manual_seed(seed)
    # All the noise is drawn on every rank, so a video does not depend on the dp layout.
    noise = torch.randn((len(labels), *shape), generator=gen)[share].to(worker.device)
    if noise.shape[0] == 0:
        return None, []
    cond = torch.tensor(labels[share], device=worker.device)
    null = torch.full_like(cond, model.config.num_classes)
    recorder = telemetry.start_recording()
    try:
        with torch.no_grad():
            videos = FlowMatchEulerSampler(num_steps=steps).sample(
                model, noise, cond, null, guidance_scale, show_progress=show_progress
            )
    finally:
        telemetry.stop_recording()
    if any(c for dim, c in worker.parallel.coordinates(worker.rank).items() if dim != "dp"):
        return None, []
    return videos.float().cpu(), recorder.records if worker.rank == 0 else []


class VideoGenerator(WorkerSession):
    """Class-conditioned video generation with the layout of ``parallel``.

    The DiT lives in one worker process per rank (an :class:`~vidpar.executor.Executor`);
    with ``cfg=2`` the conditional and unconditional passes run on different ranks, with sp
    and tp the model shards itself, and with ``dp > 1`` each replica samples its share of
    the videos. The same seed gives the same videos for every layout (up to floating-point
    summation order). LoRA adapters are set and merged in every worker
    (:meth:`set_lora_adapter`, :meth:`merge_lora`, :meth:`unmerge_lora`). A worker silent
    for ``heartbeat_timeout_s`` (as the :class:`~vidpar.executor.Executor`'s) fails the
    call. Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        dit_config: DiTConfig,
        weights: str | Path | None = None,
        parallel: ParallelConfig | None = None,
        devices: str | list[str] = "auto",
        data_info: dict[str, Any] | None = None,
        heartbeat_timeout_s: float | None = HEARTBEAT_TIMEOUT_S,
    ) -> None:
        check_generatable(dit_config)
        parallel = parallel or ParallelConfig()
        parallel.check_heads(dit_config.num_heads)
        self.dit_config = dit_config
        #: ``class_names`` and ``video_shape`` ``[C, T, H, W]`` of the training data, if known.
        self.data_info = data_info or {}
        self.class_names = self.data_info.get("class_names")
        factory = functools.partial(_build_dit, config=asdict(dit_config))
        super().__init__(parallel, factory, devices, heartbeat_timeout_s)
        try:
            if weights is not None:
                self.executor.collective_rpc("load_weights", os.fspath(weights))
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        parallel: ParallelConfig | None = None,
        trust: bool = False,
        **kwargs: Any,
    ) -> VideoGenerator:
        """From a safetensors file written by :func:`export_weights` or
        :func:`vidpar.lightning.export_full_checkpoint`, or a vidpar checkpoint directory
        (``checkpoints/last.ckpt`` of ``vidpar-train``: exported once into the user's cache,
        ``$XDG_CACHE_HOME/vidpar``; nothing is written beside it). A directory must be
        signed with this user's key unless ``trust`` (see
        :mod:`~vidpar.distributed.checkpoint_signing`)."""
        path = checkpoint_weights(path, trust=trust)
        config, data_info = read_model_info(path)
        return cls(config, weights=path, parallel=parallel, data_info=data_info, **kwargs)

    def generate(
        self,
        prompt_or_class: int | str | list[int | str],
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int = 20,
        guidance_scale: float = 3.0,
        seed: int = 0,
        output: str | Path | None = None,
        show_progress: bool = True,
        fps: int = 4,
        output_type: Literal["uint8", "float"] = "uint8",
    ) -> np.ndarray | torch.Tensor:
        """One video per class (index or name) from the noise of ``seed``.

        Sizes left out come from the training data's ``video_shape`` when the checkpoint
        recorded it. Returns uint8 frames ``[N, T, H, W, 3]``, or with
        ``output_type="float"`` the sampler's float32 videos ``[N, C, T, H, W]`` (nominally
        in [-1, 1], not clipped). ``output`` (``.mp4`` or ``.gif``) gets the videos side by
        side.
        """
        if output_type not in ("uint8", "float"):
            raise ValueError(f"output_type must be 'uint8' or 'float', got {output_type!r}")
        labels, shape = plan_request(
            self.dit_config,
            self.data_info,
            prompt_or_class,
            num_frames=num_frames,
            height=height,
            width=width,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            output=output,
        )
        check_generation(  # the output path and memory, before the workers sample
            self.dit_config,
            len(labels),
            shape,
            self.parallel,
            guided=guidance_scale != 1.0,
            output=output,
            device=self.device_type,
        )
        results = self.executor.collective_rpc(
            _generate_on_worker, labels, shape, steps, guidance_scale, seed, show_progress
        )
        self.last_records = results[0][1]
        videos = torch.cat([v for v, _ in self.replica_leaders(results) if v is not None])
        frames = np.stack([to_uint8_frames(v) for v in videos])
        if output is not None:
            write_video(output, np.concatenate(list(frames), axis=2), fps=fps)
        return videos if output_type == "float" else frames

    # LoRA -------------------------------------------------------------------------------

    def set_lora_adapter(
        self, name: str, path_or_state: str | Path | Mapping[str, torch.Tensor]
    ) -> list[str]:
        """Load adapter ``name`` (full factors, see :mod:`vidpar.nn.lora`) into every
        worker; returns the weights it targets."""
        if isinstance(path_or_state, Path):
            path_or_state = os.fspath(path_or_state)
        return self.executor.collective_rpc("set_lora_adapter", name, path_or_state)[0]


class RequestError(ValueError):
    """A generation argument that cannot work; :attr:`argument` names it."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


def plan_request(
    dit_config: DiTConfig,
    data_info: Mapping[str, Any],
    prompt_or_class: int | str | list[int | str],
    *,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int = 0,
    output: str | Path | None = None,
) -> tuple[list[int], tuple[int, int, int, int]]:
    """Check the arguments of :meth:`VideoGenerator.generate` for a model of ``dit_config``
    trained on ``data_info`` (no worker needed); returns the labels and the videos' shape
    ``(C, T, H, W)``. Raises :class:`RequestError` naming the first wrong argument."""
    if not _is_int(steps) or steps < 1:
        raise RequestError("steps", f"steps must be a positive integer, got {steps!r}")
    if not isinstance(guidance_scale, numbers.Real) or not math.isfinite(guidance_scale):
        raise RequestError(
            "guidance_scale", f"guidance_scale must be a finite number, got {guidance_scale!r}"
        )
    if not _is_int(seed):
        raise RequestError("seed", f"seed must be an integer, got {seed!r}")
    if output is not None and Path(output).suffix.lower() not in VIDEO_EXTENSIONS:
        raise RequestError(
            "output",
            f"output must end in {' or '.join(VIDEO_EXTENSIONS)} (the video format), got "
            f"{str(output)!r}",
        )
    items = prompt_or_class if isinstance(prompt_or_class, list) else [prompt_or_class]
    if not items:
        raise RequestError("prompt_or_class", "give at least one class to generate")
    labels = [_label(item, dit_config, data_info.get("class_names") or []) for item in items]
    size = _video_size(dit_config, data_info, num_frames, height, width)
    return labels, (dit_config.in_channels, *size)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _label(prompt_or_class: int | str, config: DiTConfig, names: list[str]) -> int:
    """The class index of a class index or name."""
    if _is_int(prompt_or_class):
        if not 0 <= prompt_or_class < config.num_classes:
            raise RequestError(
                "prompt_or_class",
                f"class {prompt_or_class} is outside 0..{config.num_classes - 1}",
            )
        return int(prompt_or_class)
    if prompt_or_class in names:
        return names.index(prompt_or_class)
    raise RequestError(
        "prompt_or_class",
        f"{prompt_or_class!r} is not a class this model knows; it is class-conditioned on "
        f"{names or list(range(config.num_classes))}",
    )


def _video_size(
    config: DiTConfig,
    data_info: Mapping[str, Any],
    num_frames: int | None,
    height: int | None,
    width: int | None,
) -> tuple[int, int, int]:
    """``(T, H, W)``: given, else the training data's; checked against the patch."""
    known = data_info.get("video_shape")
    size = [num_frames, height, width]
    names = ("num_frames", "height", "width")
    for i, (name, value) in enumerate(zip(names, size, strict=True)):
        if value is None:
            if not known:
                raise RequestError(
                    name, f"give {name}: the checkpoint does not record a video_shape"
                )
            size[i] = value = int(known[i + 1])
        if not _is_int(value) or value < 1:
            raise RequestError(name, f"{name} must be a positive integer, got {value!r}")
    for name, value, patch in zip(names, size, config.patch_size, strict=True):
        if value % patch:
            raise RequestError(
                name,
                f"video size (num_frames, height, width) = {tuple(size)} is not divisible by "
                f"the model's patch_size {tuple(config.patch_size)} ({name}={value})",
            )
    return size[0], size[1], size[2]


def check_generatable(config: DiTConfig) -> None:
    """The generator samples pixels of class-conditioned models; say so before starting."""
    if config.num_classes < 1:
        raise ValueError(
            "VideoGenerator needs a class-conditioned DiT (num_classes > 0); this one has "
            "num_classes=0"
        )
    if config.in_channels not in (1, 3) or config.out_channels != config.in_channels:
        raise ValueError(
            "VideoGenerator samples pixel videos: in_channels and out_channels must both be 3 "
            f"(RGB) or 1 (grey), got {config.in_channels} and {config.out_channels}"
        )
