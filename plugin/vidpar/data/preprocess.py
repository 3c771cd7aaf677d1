"""A folder of captioned videos to the latents folder :class:`~vidpar.data.LatentsDataset`
reads, through a diffusers Wan pipeline folder's VAE and text encoder, on the ranks of a
``parallel`` layout.

Videos are ``.mp4``/``.webm``/``.mov`` files; a video's caption is the same-named ``.txt``
file, else its entry in ``captions.jsonl`` (``{"file": "a.mp4", "caption": "..."}`` lines)
or ``captions.csv`` (columns ``file``, ``caption``). Each video gives ``num_frames`` frames
(4k + 1, as Wan's VAE takes them) sampled evenly over the clip, resized so they cover
``height`` × ``width`` and centre-cropped; the VAE's latent mean, normalised with its
``latents_mean``/``latents_std``, and the text encoder's embeddings of the caption (those of
``WanPipeline.encode_prompt``, without the zero padding) are written as
``<video stem>.safetensors``, atomically, with the source's size and mtime in its metadata.

The work runs in an :class:`~vidpar.executor.Executor`'s workers: the videos are dealt
over the dp replicas, one video per replica at a time; within a replica the VAE is split
in rows over its ranks (:func:`vidpar.models.parallelize_vae`) and the text encoder
FSDP2-sharded over them (:func:`vidpar.pipelines.prompt_encoding.load_text_encoder`), and
the replica's first rank writes. A rerun skips the samples whose recorded source size and
mtime still match. Unreadable or too-short videos and videos without a caption are
skipped and counted in the returned :class:`PreprocessReport`.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vidpar.config import ParallelConfig
from vidpar.data.latents import LATENTS, NEGATIVE, PROMPT

__all__ = ["VIDEO_EXTENSIONS", "PreprocessReport", "find_captions", "preprocess_videos"]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov")


@dataclass
class PreprocessReport:
    """What a run did: videos written, already there (resumed) and skipped (by file name,
    in the folder's order), and its seconds of encoding."""

    written: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    uncaptioned: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line: the counts and the rate."""
        rate = len(self.written) / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{len(self.written)} written ({rate:.2f} videos/s), {len(self.existing)} already "
            f"there, {len(self.unreadable)} unreadable or too short, {len(self.uncaptioned)} "
            "without a caption"
        )


def find_captions(folder: Path, videos: list[Path]) -> dict[str, str]:
    """Each video's caption by file name: ``<stem>.txt`` beside it wins over the folder's
    ``captions.jsonl`` / ``captions.csv``."""
    captions: dict[str, str] = {}
    if (folder / "captions.jsonl").is_file():
        for n, line in enumerate((folder / "captions.jsonl").read_text().splitlines(), 1):
            if line.strip():
                entry = json.loads(line)
                if not {"file", "caption"} <= set(entry):
                    raise ValueError(
                        f"{folder / 'captions.jsonl'} line {n} needs 'file' and 'caption' keys"
                    )
                captions[entry["file"]] = entry["caption"]
    if (folder / "captions.csv").is_file():
        with open(folder / "captions.csv", newline="") as f:
            reader = csv.DictReader(f)
            if not {"file", "caption"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{folder / 'captions.csv'} needs the columns file, caption")
            captions.update({row["file"]: row["caption"] for row in reader})
    for video in videos:
        text = video.with_suffix(".txt")
        if text.is_file():
            captions[video.name] = text.read_text().strip()
    return captions


def _read_frames(path: Path) -> np.ndarray:
    """Every frame of a video as uint8 ``[T, H, W, 3]`` (PyAV decodes mp4, webm and mov)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _clip(frames: np.ndarray, num_frames: int, height: int, width: int) -> torch.Tensor:
    """``num_frames`` frames evenly over the clip, resized to cover ``height`` × ``width``
    and centre-cropped, in [-1, 1] as ``[3, T, H, W]``."""
    index = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    video = torch.from_numpy(frames[index]).permute(0, 3, 1, 2).float() / 127.5 - 1  # T C H W
    scale = max(height / video.shape[2], width / video.shape[3])
    size = (max(height, round(video.shape[2] * scale)), max(width, round(video.shape[3] * scale)))
    video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return video[:, :, top : top + height, left : left + width].permute(1, 0, 2, 3).clamp(-1, 1)


def _source_stamp(video: Path) -> dict[str, str]:
    """What a sample records of its video, to tell on a rerun whether it is still current."""
    stat = video.stat()
    return {
        "source": video.name,
        "source_size": str(stat.st_size),
        "source_mtime_ns": str(stat.st_mtime_ns),
    }


def _is_current(target: Path, video: Path) -> bool:
    """``target`` exists and was written from ``video`` as it is now (size and mtime)."""
    from safetensors import safe_open

    if not target.is_file():
        return False
    try:
        with safe_open(str(target), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # a foreign or damaged file: written again
        return False
    return all(metadata.get(k) == v for k, v in _source_stamp(video).items())


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(partial), metadata=metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class _Encoders:
    """One worker's share of the pipeline folder's VAE and text encoder, split over the
    ranks of its replica, encoding as ``WanPipeline`` does."""

    def __init__(self, pipeline: Path, device: torch.device, dtype: torch.dtype) -> None:
        from vidpar.distributed.state import get_parallel_state
        from vidpar.models.parallel_vae import parallelize_vae
        from vidpar.models.pretrained import load_pretrained
        from vidpar.pipelines import prompt_encoding

        replica = get_parallel_state().group("replica")
        self.is_writer = replica.is_first_rank
        self.group = replica.device_group if replica.world_size > 1 else None
        vae = load_pretrained(pipeline, "vae", device=device, dtype=dtype).eval()
        self.vae = parallelize_vae(vae.requires_grad_(False), replica)
        self.tokenizer = prompt_encoding.load_tokenizer(pipeline / "tokenizer")
        self.text_encoder = prompt_encoding.load_text_encoder(
            pipeline / "text_encoder", dtype, device, self.group
        )
        config = self.vae.config
        self.mean = torch.tensor(config.latents_mean, device=device).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(config.latents_std, device=device).view(1, -1, 1, 1, 1)
        self.device, self.dtype = device, dtype
        self.negative: torch.Tensor | None = None

    @torch.no_grad()
    def latents(self, video: torch.Tensor) -> torch.Tensor:
        """Every rank of the replica together: the normalised latent mean of ``video``."""
        z = self.vae.encode(video[None].to(self.device, self.dtype)).latent_dist.mean
        return ((z.float() - self.mean) / self.std)[0]

    def text(self, prompt: str, max_len: int) -> torch.Tensor:
        """Every rank of the replica together: ``prompt``'s embeddings, its tokens only."""
        from vidpar.pipelines import prompt_encoding

        ids, mask = prompt_encoding.tokenize(self.tokenizer, [prompt], max_len)
        embeds = prompt_encoding.encode_on_replica(self.text_encoder, ids, mask, self.group)
        return embeds[0, : int(mask.sum())].float()


def _build_encoders(worker, pipeline: str, dtype: torch.dtype, negative: str | None, max_len):
    """Worker factory: the encoders, and the negative prompt's embeddings, encoded once."""
    encoders = worker.encoders = _Encoders(Path(pipeline), worker.device, dtype)
    if negative is not None:
        encoders.negative = encoders.text(negative, max_len)
    return encoders.vae


def _encode_on_worker(worker, jobs: list[dict[str, Any] | None]) -> str | None:
    """Every rank: its replica's job of this round (``jobs[dp coordinate]``), encoded by all
    of the replica's ranks, written by its first; returns ``"written"``/``"unreadable"``
    on the writer, else None."""
    job = jobs[worker.parallel.coordinates(worker.rank)["dp"]]
    if job is None:
        return None
    encoders: _Encoders = worker.encoders
    video = Path(job["video"])
    try:  # every rank of the replica reads it, so all agree on what follows
        frames = _read_frames(video)
    except Exception:  # any decoding failure: skipped and counted
        frames = None
    num_frames, height, width = job["size"]
    if frames is None or len(frames) < num_frames:
        return "unreadable" if encoders.is_writer else None
    sample = {
        LATENTS: encoders.latents(_clip(frames, num_frames, height, width)),
        PROMPT: encoders.text(job["caption"], job["max_len"]),
    }
    if encoders.negative is not None:
        sample[NEGATIVE] = encoders.negative
    if not encoders.is_writer:
        return None
    _save_atomically(sample, Path(job["target"]), _source_stamp(video))
    return "written"


def preprocess_videos(
    videos: str | os.PathLike,
    pipeline: str | os.PathLike,
    out: str | os.PathLike,
    *,
    num_frames: int = 81,
    height: int = 480,
    width: int = 832,
    negative_prompt: str | None = None,
    max_text_len: int = 512,
    parallel: ParallelConfig | None = None,
    devices: str | list[str] = "auto",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> PreprocessReport:
    """Encode the captioned videos of folder ``videos`` with the VAE and text encoder of the
    diffusers pipeline folder ``pipeline`` (``vae/``, ``text_encoder/``, ``tokenizer/``) into
    the latents folder ``out`` (see the module doc) on the workers of ``parallel`` (default:
    one) on ``devices``; returns the run's report. Workers start only if there is work.

    ``negative_prompt`` (optional) is encoded once and stored with every sample. Raises
    ``ValueError`` before any encoding for a frame count that is not 4k + 1, a missing
    folder, or a folder without videos."""
    from tqdm.auto import tqdm

    from vidpar.executor import Executor

    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k + 1 (Wan's VAE: 1, 5, ..., 81), got {num_frames}")
    source, pipeline, out = Path(videos), Path(pipeline), Path(out)
    if not source.is_dir():
        raise FileNotFoundError(f"the video folder {source} does not exist")
    for part in ("vae", "text_encoder", "tokenizer"):
        if not (pipeline / part).is_dir():
            raise FileNotFoundError(
                f"{pipeline} is not a diffusers pipeline folder with {part}/ (give e.g. a local "
                "Wan-AI/Wan2.1-T2V-1.3B-Diffusers)"
            )
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not files:
        raise ValueError(f"{source} holds no {'/'.join(VIDEO_EXTENSIONS)} videos")
    captions = find_captions(source, files)
    parallel = parallel or ParallelConfig()
    report, jobs = PreprocessReport(), []
    for video in files:
        target = out / f"{video.stem}.safetensors"
        if _is_current(target, video):
            report.existing.append(video.name)
        elif video.name not in captions:
            report.uncaptioned.append(video.name)
        else:
            jobs.append(
                {
                    "video": str(video),
                    "target": str(target),
                    "caption": captions[video.name],
                    "size": (num_frames, height, width),
                    "max_len": max_text_len,
                }
            )
    out.mkdir(parents=True, exist_ok=True)
    if not jobs:
        return report
    factory = functools.partial(
        _build_encoders,
        pipeline=str(pipeline),
        dtype=dtype,
        negative=negative_prompt,
        max_len=max_text_len,
    )
    done: dict[str, str] = {}
    with Executor(parallel, worker_factory=factory, devices=devices) as executor:
        dp = executor.parallel.dp
        start = time.perf_counter()
        bar = tqdm(total=len(jobs), desc="preprocess", unit="video", disable=not progress)
        for first in range(0, len(jobs), dp):
            round_jobs = jobs[first : first + dp]
            round_jobs += [None] * (dp - len(round_jobs))
            results = executor.collective_rpc(_encode_on_worker, round_jobs)
            for d, job in enumerate(round_jobs):
                if job is not None:
                    done[job["video"]] = results[executor.parallel.rank({"dp": d})]
            bar.update(sum(job is not None for job in round_jobs))
        bar.close()
        report.seconds = time.perf_counter() - start
    for job in jobs:
        name = Path(job["video"]).name
        (report.written if done[job["video"]] == "written" else report.unreadable).append(name)
    report.unreadable.sort()
    return report
