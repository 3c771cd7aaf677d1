"""A folder of captioned videos to the latents folder :class:`~vidpar.data.LatentsDataset`
reads, through a diffusers Wan pipeline folder's VAE and text encoder.

Videos are ``.mp4``/``.webm``/``.mov`` files; a video's caption is the same-named ``.txt``
file, else its entry in ``captions.jsonl`` (``{"file": "a.mp4", "caption": "..."}`` lines)
or ``captions.csv`` (columns ``file``, ``caption``). Each video gives ``num_frames`` frames
(4k + 1, as Wan's VAE takes them) sampled evenly over the clip, resized so they cover
``height`` × ``width`` and centre-cropped; the VAE's latent mean, normalised with its
``latents_mean``/``latents_std``, and the text encoder's embeddings of the caption (those of
``WanPipeline.encode_prompt``, without the zero padding) are written as
``<video stem>.safetensors``, atomically. A run is resumable (samples already written are
skipped) and splits the videos over the ranks of the torch.distributed world, if one is
joined. Unreadable or too-short videos and videos without a caption are skipped and
counted in the returned :class:`PreprocessReport`.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vidpar.data.latents import LATENTS, NEGATIVE, PROMPT

__all__ = ["VIDEO_EXTENSIONS", "PreprocessReport", "find_captions", "preprocess_videos"]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov")


@dataclass
class PreprocessReport:
    """What one rank did: samples written, already there (resumed), and skipped."""

    written: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    uncaptioned: list[str] = field(default_factory=list)


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


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(partial))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class _Encoders:
    """The pipeline folder's VAE, tokenizer and text encoder, encoding as WanPipeline does."""

    def __init__(self, pipeline: Path, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import WanPipeline
        from transformers import AutoTokenizer, UMT5EncoderModel

        from vidpar.models.pretrained import load_pretrained

        self.vae = load_pretrained(pipeline, "vae", device=device, dtype=dtype).eval()
        encoder = UMT5EncoderModel.from_pretrained(pipeline / "text_encoder", torch_dtype=dtype)
        self.pipe = WanPipeline(
            tokenizer=AutoTokenizer.from_pretrained(pipeline / "tokenizer"),
            text_encoder=encoder.to(device).eval(),
            vae=None,
            transformer=None,
            scheduler=None,
        )
        config = self.vae.config
        self.mean = torch.tensor(config.latents_mean, device=device).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(config.latents_std, device=device).view(1, -1, 1, 1, 1)
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def latents(self, video: torch.Tensor) -> torch.Tensor:
        x = video[None].to(self.device, self.dtype)
        z = self.vae.encode(x).latent_dist.mean
        return ((z.float() - self.mean) / self.std)[0]

    @torch.no_grad()
    def text(self, prompt: str, max_len: int) -> torch.Tensor:
        tokens = self.pipe.tokenizer(
            prompt, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
        )
        length = int(tokens.attention_mask.sum())
        embeds, _ = self.pipe.encode_prompt(
            prompt,
            do_classifier_free_guidance=False,
            max_sequence_length=max_len,
            device=self.device,
            dtype=self.dtype,
        )
        return embeds[0, :length].float()


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
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> PreprocessReport:
    """Encode the captioned videos of folder ``videos`` with the VAE and text encoder of the
    diffusers pipeline folder ``pipeline`` (``vae/``, ``text_encoder/``, ``tokenizer/``) into
    the latents folder ``out`` (see the module doc); returns this rank's report.

    ``negative_prompt`` (optional) is encoded once and stored with every sample. Raises
    ``ValueError`` before any encoding for a frame count that is not 4k + 1, a missing
    folder, or a folder without videos."""
    from tqdm.auto import tqdm

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
    rank, world = _rank_and_world()
    mine = files[rank::world]
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoders = _Encoders(pipeline, device, dtype)
    negative = None if negative_prompt is None else encoders.text(negative_prompt, max_text_len)
    report = PreprocessReport()
    for video in tqdm(mine, desc="preprocess", disable=not progress or rank != 0):
        target = out / f"{video.stem}.safetensors"
        if target.is_file():
            report.existing.append(video.name)
            continue
        if video.name not in captions:
            report.uncaptioned.append(video.name)
            continue
        try:
            frames = _read_frames(video)
        except Exception:  # any decoding failure: skipped and counted
            report.unreadable.append(video.name)
            continue
        if len(frames) < num_frames:
            report.unreadable.append(video.name)
            continue
        sample = {
            LATENTS: encoders.latents(_clip(frames, num_frames, height, width)),
            PROMPT: encoders.text(captions[video.name], max_text_len),
        }
        if negative is not None:
            sample[NEGATIVE] = negative
        _save_atomically(sample, target)
        report.written.append(video.name)
    return report
