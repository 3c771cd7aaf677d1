"""The worker side of DiffusersPipelineGenerator: each rank builds its parts of a diffusers
pipeline folder (transformer, VAE, scheduler, image encoder; the text encoder sharded where
the caller asks) and runs one generation's stages (encode, denoise, decode, frames) with
their times and peaks."""

from __future__ import annotations

import time
from typing import Any

import torch

from vidpar.distributed import telemetry
from vidpar.distributed.state import get_parallel_state
from vidpar.executor import wire
from vidpar.pipelines import prompt_encoding
from vidpar.pipelines.image_condition import (
    ImageCondition,
    encode_first_frame,
    image_tokens,
    load_image_encoder,
    load_image_processor,
)
from vidpar.pipelines.pipeline_denoise import denoise, load_scheduler
from vidpar.pipelines.pipeline_folder import PipelineFolder, read_pipeline_folder
from vidpar.pipelines.pipeline_frames import frames_in_shared_memory, write_output


def build_worker(worker, folder: str, dtype: torch.dtype, encode_on_workers: bool):
    """Worker factory: the transformer(s), prepared for the layout; the scheduler's folder;
    the VAE split over the replica's ranks (all of them decode, see :func:`decode_latents`);
    and, unless the parent encodes, the text encoder sharded over the replica."""
    from vidpar.models import parallelize, parallelize_vae
    from vidpar.models.pretrained import load_pretrained

    spec = read_pipeline_folder(folder)
    models = {
        name: parallelize(load_pretrained(spec.components[name], device=worker.device, dtype=dtype))
        .eval()
        .requires_grad_(False)
        for name in spec.transformers
    }
    worker.transformers = models
    worker.pipeline_spec = spec
    # Loaded once and reused, as a diffusers pipeline reuses its own: set_timesteps resets it.
    worker.scheduler = load_scheduler(spec.components["scheduler"])
    vae_dtype = torch.promote_types(dtype, torch.float32)  # Wan's VAE runs in float32
    worker.vae = load_pretrained(spec.components["vae"], device=worker.device, dtype=vae_dtype)
    worker.vae.eval().requires_grad_(False)
    replica = get_parallel_state().group("replica")
    worker.vae = parallelize_vae(worker.vae, replica)  # whole, with a log line, if it cannot
    # The text encoder's FSDP2 shards and the prompts' split (torch groups; none for one rank).
    worker.replica_group = replica.device_group if replica.world_size > 1 else None
    worker.image_encoder = worker.image_processor = None
    if "image_encoder" in spec.components and spec.transformer_config.get("image_dim"):
        worker.image_encoder = load_image_encoder(
            spec.components["image_encoder"], vae_dtype, worker.device
        )
        worker.image_processor = load_image_processor(spec.components["image_processor"])
    worker.text_encoder = None
    if encode_on_workers:
        worker.text_encoder = prompt_encoding.load_text_encoder(  # never whole on a rank
            spec.components["text_encoder"], dtype, worker.device, worker.replica_group
        )
    return next(iter(models.values()))


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Wan latents (normalised, as the transformer sees them) to videos ``[B, 3, F, H, W]``
    in [-1, 1], as ``WanPipeline`` decodes them. Called on every rank of a replica together:
    the VAE is split over them (:func:`vidpar.models.parallelize_vae`)."""
    param = next(vae.parameters())
    shape = (1, vae.config.z_dim, 1, 1, 1)
    latents = latents.to(param.device, param.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents)
    return vae.decode(latents / inv_std + mean, return_dict=False)[0]


def _image_condition(worker, request: dict[str, Any], batch: int) -> ImageCondition | None:
    """The image's conditioning for this rank's ``batch`` videos (every rank of a replica
    encodes it: the VAE's encode, like its decode, may be parallel)."""
    if request.get("image") is None:
        return None
    spec: PipelineFolder = worker.pipeline_spec
    num_frames, height, width = request["video_size"]
    latents, first = encode_first_frame(
        worker.vae,
        request["image"],
        batch,
        num_frames,
        height,
        width,
        spec.settings["expand_timesteps"],
        spec.temporal_factor,
        spec.spatial_factor,
        worker.device,
    )
    tokens = None
    if worker.image_encoder is not None:
        tokens = image_tokens(worker.image_processor, worker.image_encoder, request["image"], batch)
    return ImageCondition(latents, first, tokens)


class _StageTimer:
    """Seconds per stage of one generation on this rank (the device waited for at each end),
    the :func:`time.perf_counter` stamp of each stage's end (``stamps``) and, on CUDA, each
    stage's peak of allocated memory in GiB."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self.peak_gib, self.stamps = device, {}, {}, {}
        self._cuda = device.type == "cuda"
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self.stamps[f"{stage}_end"] = self._last = now
        if self._cuda:
            self.peak_gib[stage] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)


def generate_on_worker(worker, request: dict[str, Any]) -> tuple[Any, list, dict, dict, dict]:
    """Runs on every rank: each dp replica encodes (unless the parent did) and samples its
    share of the prompts; its first rank returns ``(frames or latents, records, seconds per
    stage, peak GiB per stage, clock)`` (records from rank 0 only; peaks on
    CUDA only; ``clock``: :func:`time.perf_counter` stamps of the request's decode, the
    work's start, each stage's end and the return), the others Nones. Frames come in
    shared memory (:func:`frames_in_shared_memory`); with ``request["output"]`` the replica
    writes the file itself and returns no frames."""
    received = {f"request_{k}": v for k, v in wire.last_times.items() if k.startswith("decode")}
    clock = {**received, "worker_start": time.perf_counter()}
    batch = request["batch"]
    share = worker.dp_share(batch)
    gen = torch.Generator().manual_seed(request["seed"])
    # diffusers draws the noise of the whole batch at once in float32: so does every rank.
    noise = torch.randn((batch, *request["latent_shape"]), generator=gen, dtype=torch.float32)
    noise = noise[share].to(worker.device)
    if noise.shape[0] == 0:
        return None, [], {}, {}, {}
    timer = _StageTimer(worker.device)
    if "embeds" in request:
        cond, null = request["embeds"]
        cond, null = cond[share], null[share]
    else:
        ids, mask = request["tokens"]
        rows = torch.arange(batch)[share]
        rows = torch.cat([rows, rows + batch])  # the prompts, then their negatives
        both = prompt_encoding.encode_on_replica(
            worker.text_encoder, ids[rows], mask[rows], worker.replica_group
        )
        cond, null = both.chunk(2)
    cond, null = cond.to(worker.device), null.to(worker.device)
    timer.lap("encode_prompt")
    recorder = telemetry.start_recording()
    try:
        with torch.no_grad():
            image = _image_condition(worker, request, len(noise))
            timer.lap("encode_image")
            latents = denoise(worker, noise, cond, null, image, request)
            timer.lap("denoise")
            output = latents
            if request["decode"]:
                output = decode_latents(worker.vae, latents)
                timer.lap("decode")
    finally:
        telemetry.stop_recording()
    if not get_parallel_state().group("replica").is_first_rank:
        return None, [], {}, {}, {}
    if request["decode"]:
        # On the device, as WanPipeline does; the frames' one copy lands in shared memory.
        output = frames_in_shared_memory(output)
        timer.lap("frames")
        if request.get("output") is not None:
            write_output(request["output"], output, request["fps"])
            timer.lap("write")
            output = None
    else:
        output = output.cpu()
    records = recorder.records if worker.rank == 0 else []
    clock.update(timer.stamps, worker_return=time.perf_counter())
    return output, records, timer.seconds, timer.peak_gib, clock
