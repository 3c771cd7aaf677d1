"""DiffusersPipelineGenerator: a diffusers Wan pipeline folder in, a video out, on many
devices through the Executor, sampling as the pipeline class samples (its scheduler, its
guidance, Wan2.2's two transformers), so a seed gives diffusers' own video."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vidpar.config import ParallelConfig
from vidpar.executor import wire
from vidpar.executor.executor import HEARTBEAT_TIMEOUT_S
from vidpar.models.plan import check_heads
from vidpar.pipelines import prompt_encoding
from vidpar.pipelines.image_condition import (
    read_image,
)
from vidpar.pipelines.pipeline_folder import (
    MAX_SEQUENCE_LENGTH,
    read_pipeline_folder,
)
from vidpar.pipelines.pipeline_frames import write_output
from vidpar.pipelines.pipeline_worker import build_worker, generate_on_worker
from vidpar.pipelines.preflight import check_diffusers_generation
from vidpar.pipelines.worker_session import WorkerSession

Prompts = str | Sequence[str]
#: Precomputed embeddings: ``[L, D]``, ``[B, L, D]`` or a list of ``[L_i, D]``.
Embeds = torch.Tensor | Sequence[torch.Tensor]


def _as_list(embeds: Embeds) -> list[torch.Tensor]:
    if isinstance(embeds, torch.Tensor) and embeds.dim() in (2, 3):
        return [embeds] if embeds.dim() == 2 else list(embeds.unbind(0))
    if not isinstance(embeds, torch.Tensor) and all(
        isinstance(e, torch.Tensor) and e.dim() == 2 for e in embeds
    ):
        return list(embeds)
    raise ValueError("prompt embeddings must be [L, D], [B, L, D] or a list of [L, D] tensors")


def _padded(items: list[torch.Tensor], length: int) -> torch.Tensor:
    out = items[0].new_zeros(len(items), length, items[0].shape[-1])
    for i, item in enumerate(items):
        out[i, : len(item)] = item
    return out


class DiffusersPipelineGenerator(WorkerSession):
    """Text to video from a diffusers Wan pipeline folder, with the layout of ``parallel``,
    through an :class:`~vidpar.executor.Executor`.

    ``path`` is a folder as ``WanPipeline.save_pretrained`` writes it (``model_index.json``,
    ``tokenizer/``, ``text_encoder/``, ``transformer/`` and maybe ``transformer_2/``,
    ``vae/``, ``scheduler/``). Each worker loads the transformer(s) in ``dtype`` and
    prepares them with :func:`vidpar.models.parallelize` (sp, tp, cfg2, dp as
    :class:`~vidpar.pipelines.DiffusersVideoGenerator`); sampling is the pipeline class's
    own loop over the folder's scheduler, so a seed gives the video ``WanPipeline`` gives.
    The text encoder is sharded (FSDP2) over the ranks of each dp replica, which split the
    prompts between them; ``text_encoder_offload="cpu"`` keeps it whole on the CPU of this
    process instead. Every rank of a replica decodes (:func:`~vidpar.pipelines.pipeline_worker.decode_latents`). A worker
    silent for ``heartbeat_timeout_s`` fails the call. Use as a context manager, or call
    :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        parallel: ParallelConfig | None = None,
        dtype: torch.dtype = torch.float32,
        devices: str | list[str] = "auto",
        text_encoder_offload: Literal["none", "cpu"] | None = None,
        heartbeat_timeout_s: float | None = HEARTBEAT_TIMEOUT_S,
    ) -> None:
        self.spec = read_pipeline_folder(path)
        if text_encoder_offload not in (None, "none", "cpu"):
            raise ValueError(
                f"text_encoder_offload must be 'none' or 'cpu', got {text_encoder_offload!r}"
            )
        self.dtype = dtype
        parallel = parallel or ParallelConfig()
        check_heads(parallel, self.spec.transformer_config["num_attention_heads"])
        self.tokenizer = prompt_encoding.load_tokenizer(self.spec.components["tokenizer"])
        self.text_encoder = None
        if text_encoder_offload == "cpu":
            self.text_encoder = prompt_encoding.load_text_encoder(
                self.spec.components["text_encoder"], dtype
            )
        factory = functools.partial(
            build_worker,
            folder=str(self.spec.root),
            dtype=dtype,
            encode_on_workers=self.text_encoder is None,
        )
        super().__init__(parallel, factory, devices, heartbeat_timeout_s)
        #: Seconds per stage of the last ``generate`` on rank 0 (``encode_prompt``,
        #: ``encode_image``, ``denoise``, ``decode``).
        self.last_timings: dict[str, float] = {}
        #: Rank 0's peak of allocated GPU memory (GiB) in each stage of the last
        #: ``generate`` (empty off CUDA).
        self.last_peak_gib: dict[str, float] = {}
        #: The last ``generate`` on one time line, seconds from its start (``call``), in
        #: order: this process's stamps (``request_send``, ``request_encode_start``/``_end``,
        #: ``reply_decode_start``/``_end``, ``rpc_return``, ``handed_back``) and rank 0's
        #: (``request_decode_start``/``_end``, ``worker_start``, each stage's ``<stage>_end``,
        #: ``worker_return``). :func:`time.perf_counter` is system-wide on Linux, so the
        #: processes' stamps compare.
        self.last_timeline: dict[str, float] = {}

    def _embeddings(
        self, prompt_embeds: Embeds, negative: Embeds | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cond = _as_list(prompt_embeds)
        null = _as_list(negative) if negative is not None else [torch.zeros_like(cond[0][:1])]
        if len(null) == 1 < len(cond):
            null = null * len(cond)
        if len(null) != len(cond):
            raise ValueError(f"{len(cond)} prompt embeddings but {len(null)} negative ones")
        dim = self.spec.transformer_config["text_dim"]
        if any(e.shape[-1] != dim for e in cond + null):
            raise ValueError(f"prompt embeddings must be [L, {dim}] (the model's text_dim)")
        length = max(len(e) for e in cond + null)
        return _padded(cond, length), _padded(null, length)

    def generate(
        self,
        prompt: Prompts | None = None,
        negative_prompt: Prompts | None = None,
        *,
        image: Any = None,
        prompt_embeds: Embeds | None = None,
        negative_prompt_embeds: Embeds | None = None,
        num_frames: int = 81,
        height: int = 480,
        width: int = 832,
        steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_scale_2: float | None = None,
        seed: int = 0,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        output: str | os.PathLike | None = None,
        fps: int = 16,
        output_type: Literal["np", "latent"] = "np",
        return_frames: bool = True,
    ) -> np.ndarray | torch.Tensor | None:
        """One video per prompt from the noise of ``seed`` (with a ``torch.Generator``
        seeded so, diffusers' pipeline gives the same video).

        ``prompt``: a text or a list; ``negative_prompt``: one text for all or one per prompt
        (default ``""``, as diffusers). ``image`` (an image file, a PIL image or an
        ``[H, W, 3]`` array) is the first frame of image-to-video: an I2V folder needs one,
        a TI2V one (``expand_timesteps``) takes one. Or ``prompt_embeds`` (and
        ``negative_prompt_embeds``, default zeros) precomputed. Returns float32 videos ``[B, F, H, W, 3]`` in [0, 1]
        (diffusers' ``output_type="np"``), or the latents ``[B, C, T, H, W]``.
        ``output``: ``.npy`` (``[F, H, W, 3]`` for one prompt, ``[B, F, H, W, 3]`` for
        several), ``.mp4`` or ``.gif`` (the videos side by side). With
        ``return_frames=False`` (``output=`` needed) nothing is returned: with one dp
        replica the worker writes the file and no frames cross to this process.

        :attr:`last_timeline` tells where the call's time went.
        """
        called = time.perf_counter()
        if output_type not in ("np", "latent"):
            raise ValueError(f"output_type must be 'np' or 'latent', got {output_type!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if output is not None and Path(output).suffix not in (".npy", ".mp4", ".gif"):
            raise ValueError(f"output={output} must end in .npy, .mp4 or .gif")
        if output is not None and output_type == "latent":
            raise ValueError("output= writes videos: it needs output_type='np'")
        if not return_frames and output is None:
            raise ValueError("return_frames=False needs output= (the frames go there)")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass either prompt (text) or prompt_embeds, not both or neither")
        if image is None and self.spec.needs_image:
            raise ValueError(f"{self.spec.root} is a {self.spec.pipeline_class}: pass image=")
        if image is not None and not self.spec.takes_image:
            raise ValueError(f"{self.spec.root} is a text-to-video {self.spec.pipeline_class}")
        num_frames, height, width = self.spec.video_size(num_frames, height, width)
        request: dict[str, Any] = {
            "image": None if image is None else read_image(image),
            "video_size": (num_frames, height, width),
            "latent_shape": self.spec.latent_shape(num_frames, height, width),
            "steps": steps,
            "guidance_scale": guidance_scale,
            "guidance_scale_2": guidance_scale if guidance_scale_2 is None else guidance_scale_2,
            "seed": seed,
            "decode": output_type == "np",
        }
        if prompt_embeds is not None:
            request["embeds"] = self._embeddings(prompt_embeds, negative_prompt_embeds)
            request["batch"] = len(request["embeds"][0])
        else:
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            negatives = negative_prompt if negative_prompt is not None else ""
            negatives = [negatives] * len(texts) if isinstance(negatives, str) else negatives
            if not texts or not all(isinstance(t, str) for t in [*texts, *negatives]):
                raise ValueError("prompt (and negative_prompt) must be a text or a list of texts")
            if len(negatives) != len(texts):
                raise ValueError(f"{len(texts)} prompts but {len(negatives)} negative prompts")
            ids, mask = prompt_encoding.tokenize(
                self.tokenizer, [*texts, *negatives], max_sequence_length
            )
            request["batch"] = len(texts)
            if self.text_encoder is not None:
                embeds = prompt_encoding.encode(self.text_encoder, ids, mask)
                request["embeds"] = tuple(embeds.chunk(2))
            else:
                request["tokens"] = (ids, mask)
        check_diffusers_generation(  # the output path and memory, before the workers sample
            self.spec.transformer_config,
            request["batch"],
            request["latent_shape"],
            request["video_size"] if request["decode"] else None,
            self.parallel,
            guided=guidance_scale > 1.0,
            output=output,
            device=self.device_type,
        )
        in_worker = not return_frames and self.parallel.dp == 1
        if in_worker:  # the replica writes the file: no frames cross to this process
            request.update(output=os.path.abspath(output), fps=fps)  # this process's cwd
        sending = time.perf_counter()
        results = self.executor.collective_rpc(generate_on_worker, request)
        replied = time.perf_counter()
        sent = {f"request_{k}": v for k, v in wire.last_times.items() if k.startswith("encode")}
        got = {f"reply_{k}": v for k, v in wire.last_times.items() if k.startswith("decode")}
        _, self.last_records, self.last_timings, self.last_peak_gib, worker_clock = results[0]
        leaders = [r[0] for r in self.replica_leaders(results)]
        parts = [r for r in leaders if r is not None]
        if output_type == "latent":
            result = torch.cat(parts)
        elif in_worker:
            result = None
        else:
            result = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if output is not None:
                write_output(output, result, fps)
        stamps = {
            "call": called,
            "request_send": sending,
            **sent,
            **worker_clock,
            **got,
            "rpc_return": replied,
            "handed_back": time.perf_counter(),
        }
        self.last_timeline = {k: v - called for k, v in sorted(stamps.items(), key=lambda i: i[1])}
        return None if not return_frames else result
