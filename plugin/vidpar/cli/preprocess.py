"""``vidpar-preprocess``: :func:`vidpar.data.preprocess.preprocess_videos` from the command
line (Hydra config ``preprocess``): the videos dealt over the dp replicas of ``parallel=``,
each video's VAE encode split over its replica's ranks, through the Executor's workers."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from vidpar.cli.hydra_setup import UserError, build_layout, console_command, register

register()


def run(conf: DictConfig) -> None:
    """Check the settings, start the workers (if there is work) and encode."""
    from vidpar.data.preprocess import preprocess_videos

    dtype = getattr(torch, str(conf.dtype), None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"dtype={conf.dtype} is not a torch dtype (float32, bfloat16, ...)")
    parallel = build_layout(conf.parallel)
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
            parallel=parallel,
            devices=conf.devices if isinstance(conf.devices, str) else list(conf.devices),
            dtype=dtype,
        )
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    print(f"vidpar: {report.summary()}; latents in {conf.out}")
    for kind, names in (
        ("unreadable or too short", report.unreadable),
        ("without a caption", report.uncaptioned),
    ):
        if names:
            print(f"vidpar: skipped, {kind}: {', '.join(names)}")


main = console_command("preprocess", run)

if __name__ == "__main__":
    main()
