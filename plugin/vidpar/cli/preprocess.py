"""``vidpar-preprocess``: :func:`vidpar.data.preprocess.preprocess_videos` from the command
line (Hydra config ``preprocess``); under torchrun every rank takes its share of the videos."""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig

from vidpar.cli.hydra_setup import UserError, console_command, register

register()


def run(conf: DictConfig) -> None:
    """Check the settings, join torchrun's world if there is one, and encode."""
    from vidpar.data.preprocess import preprocess_videos

    dtype = getattr(torch, str(conf.dtype), None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"dtype={conf.dtype} is not a torch dtype (float32, bfloat16, ...)")
    joined = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if joined:
        from vidpar.distributed.state import init_distributed_environment

        init_distributed_environment()
    try:
        report = preprocess_videos(
            conf.videos,
            conf.pipeline,
            conf.out,
            num_frames=conf.num_frames,
            height=conf.height,
            width=conf.width,
            negative_prompt=conf.negative_prompt,
            max_text_len=conf.max_text_len,
            device=conf.device,
            dtype=dtype,
        )
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    print(
        f"vidpar: {len(report.written)} written, {len(report.existing)} already there, "
        f"{len(report.unreadable)} unreadable or too short, {len(report.uncaptioned)} "
        f"without a caption; latents in {conf.out}"
    )


main = console_command("preprocess", run)

if __name__ == "__main__":
    main()
