"""``vidpar-generate``: sample class-conditioned videos from a trained checkpoint.

With no arguments it takes the newest ``checkpoints/last.ckpt`` under ``outputs/`` (what
``vidpar-train`` writes), generates one clip per class through the Executor and writes
them side by side as an ``.mp4`` and a ``.gif``.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from vidpar.cli.hydra_setup import UserError, build_layout, console_command, register
from vidpar.distributed.checkpoint_integrity import CorruptCheckpointError, verify
from vidpar.distributed.checkpoint_store import TRAINER_STATE, resolve
from vidpar.distributed.telemetry import format_summary, summarize

register()


def find_checkpoint(checkpoint: str | None, search_dir: str) -> Path:
    """The checkpoint to use: the one given, or the newest complete one under ``search_dir``
    (a checkpoint directory resolved to its current version, so it cannot change while it
    is read, and its files checked against the manifest of its save)."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.is_file():
            return path
        if (resolved := resolve(path)) is not None:
            return _verified(resolved)
        raise UserError(
            f"checkpoint={checkpoint} is neither a .safetensors file nor a complete vidpar "
            "checkpoint directory. Pass the checkpoints/last.ckpt directory of a vidpar-train "
            "run, or a file written by vidpar.lightning.export_full_checkpoint."
        )
    candidates = (resolve(d / "last.ckpt") for d in Path(search_dir).glob("**/checkpoints"))
    found = [p for p in candidates if p is not None]
    if not found:
        raise UserError(
            f"No checkpoint found under {Path(search_dir).resolve()}: run vidpar-train first "
            "(it writes outputs/<date>/<time>/checkpoints/last.ckpt), or pass checkpoint=PATH."
        )
    return _verified(max(found, key=lambda p: (p / TRAINER_STATE).stat().st_mtime))


def _verified(ckpt: Path) -> Path:
    try:
        verify(ckpt)
    except CorruptCheckpointError as err:
        raise UserError(str(err)) from None
    return ckpt


def run(conf: DictConfig) -> list[Path]:
    """Generate as ``conf`` says; returns the written files."""
    from vidpar.pipelines.generator import VideoGenerator
    from vidpar.pipelines.video_io import write_video

    os.environ.setdefault("WANDB_MODE", "offline")
    layout = build_layout(conf.parallel)
    checkpoint = find_checkpoint(conf.checkpoint, conf.search_dir)
    print(f"vidpar: generating from {checkpoint} with {layout.describe()}")
    with VideoGenerator.from_checkpoint(checkpoint, parallel=layout) as generator:
        _, frames_, height, width = generator.data_info.get("video_shape") or (3, 8, 16, 16)
        frames = generator.generate(
            list(conf.labels),
            num_frames=conf.num_frames or frames_,
            height=conf.height or height,
            width=conf.width or width,
            steps=conf.steps,
            guidance_scale=conf.guidance_scale,
            seed=conf.seed,
            output=conf.output,
        )
        records = generator.last_records
    written = [Path(conf.output)]
    gif = Path(conf.output).with_suffix(".gif")
    if gif != written[0]:
        import numpy as np

        write_video(gif, np.concatenate(list(frames), axis=2), fps=4)
        written.append(gif)
    if conf.telemetry and records:
        print("Communication summary (rank 0, generation):\n" + format_summary(summarize(records)))
    for path in written:
        print(f"vidpar: wrote {path}")
    return written


main = console_command("generate", run)

if __name__ == "__main__":
    main()
