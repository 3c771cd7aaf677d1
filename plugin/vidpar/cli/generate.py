"""``vidpar-generate``: sample class-conditioned videos from a trained checkpoint.

With no arguments it takes the ``checkpoints/last.ckpt`` of the last ``vidpar-train`` run
under ``outputs/`` (and says which), generates one clip per class through the Executor and writes
them side by side as an ``.mp4`` and a ``.gif``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vidpar.cli.hydra_setup import UserError, build_layout, console_command, register
from vidpar.cli.validation import check_generate_request, check_generate_resources
from vidpar.config import ParallelConfig
from vidpar.distributed.checkpoint_integrity import CorruptCheckpointError, verify
from vidpar.distributed.checkpoint_store import resolve
from vidpar.distributed.telemetry import format_summary, summarize
from vidpar.nn.dit import DiTConfig

register()


def find_checkpoint(checkpoint: str | None, search_dir: str) -> Path:
    """The checkpoint to use: the one given, or that of the training run under
    ``search_dir`` that started last (a checkpoint directory resolved to its current
    version, so it cannot change while it is read, and its files checked against the
    manifest of its save)."""
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
    run = last_training_run(Path(search_dir))
    found = resolve(run / "checkpoints" / "last.ckpt")
    if found is None:
        raise UserError(
            f"The last training run under {Path(search_dir).resolve()}, {run}, has no complete "
            "checkpoints/last.ckpt (it may still be training, have stopped before its first "
            "save, or have run with trainer.max_steps=0). Pass checkpoint=PATH to use another "
            "run's checkpoint."
        )
    return _verified(found)


def last_training_run(search_dir: Path) -> Path:
    """The vidpar-train run directory under ``search_dir`` (one with a ``train.log`` or
    ``checkpoints/``) that started last, by the files Hydra writes when a job starts."""
    runs = {log.parent for log in search_dir.glob("**/train.log")}
    runs |= {ckpts.parent for ckpts in search_dir.glob("**/checkpoints") if ckpts.is_dir()}
    if not runs:
        raise UserError(
            f"No checkpoint found under {search_dir.resolve()}: run vidpar-train first (it "
            "writes outputs/<date>/<time>/checkpoints/last.ckpt), or pass checkpoint=PATH."
        )

    def started(run: Path) -> float:
        first = (run / ".hydra" / "hydra.yaml", run / "train.log", run / "checkpoints")
        return next(p for p in first if p.exists()).stat().st_mtime

    return max(runs, key=started)


def _verified(ckpt: Path) -> Path:
    try:
        verify(ckpt)
    except CorruptCheckpointError as err:
        raise UserError(str(err)) from None
    return ckpt


def read_checkpoint_model(
    checkpoint: Path, layout: ParallelConfig
) -> tuple[Path, DiTConfig, dict[str, Any]]:
    """The weights file, DiT config and training-data facts of ``checkpoint``, checked to
    be a model that ``VideoGenerator`` can sample with ``layout``."""
    from vidpar.pipelines.generator import check_generatable, checkpoint_weights, read_model_info

    try:
        weights = checkpoint_weights(checkpoint)
        dit_config, data_info = read_model_info(weights)
        check_generatable(dit_config)
    except (OSError, ValueError) as err:
        raise UserError(f"checkpoint={checkpoint} cannot be used: {err}.") from None
    try:
        layout.check_heads(dit_config.num_heads)
    except ValueError as err:
        raise UserError(
            f"The checkpoint's model does not fit the layout: {err}. Pick a layout that "
            f"divides its {dit_config.num_heads} heads (e.g. parallel=cfg2 or parallel=single)."
        ) from None
    return weights, dit_config, data_info


def run(conf: DictConfig) -> list[Path]:
    """Generate as ``conf`` says; returns the written files."""
    from vidpar.pipelines.generator import VideoGenerator
    from vidpar.pipelines.video_io import write_video

    os.environ.setdefault("WANDB_MODE", "offline")
    layout = build_layout(conf.parallel)
    checkpoint = find_checkpoint(conf.checkpoint, conf.search_dir)
    if conf.checkpoint is None:
        print(
            f"vidpar: no checkpoint= given: using the last training run under "
            f"{conf.search_dir}/, {checkpoint.parent.parent} (its checkpoints/last.ckpt)"
        )
    # Everything is checked here, before the generator starts its workers.
    weights, dit_config, data_info = read_checkpoint_model(checkpoint, layout)
    labels, shape = check_generate_request(conf, dit_config, data_info)
    check_generate_resources(conf, dit_config, layout, labels, shape)
    _, num_frames, height, width = shape
    print(f"vidpar: generating from {checkpoint} with {layout.describe()}")
    with VideoGenerator(dit_config, weights, parallel=layout, data_info=data_info) as generator:
        frames = generator.generate(
            labels,
            num_frames=num_frames,
            height=height,
            width=width,
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


main = console_command("generate", run, starts_workers=True)

if __name__ == "__main__":
    main()
