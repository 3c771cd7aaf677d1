"""``vidpar-generate``: sample class-conditioned videos from a trained checkpoint.

With no arguments it takes the ``checkpoints/last.ckpt`` of the last ``vidpar-train`` run
under ``outputs/`` (and says which), generates one clip per class through the Executor and writes
them side by side as an ``.mp4`` and a ``.gif``. With ``model.path=`` (a diffusers pipeline
folder) and ``prompt=`` it generates from text instead (:func:`run_prompts`).
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from vidpar.cli.hydra_setup import build_layout, console_command, register

register()


def run_prompts(conf: DictConfig) -> list[Path]:
    """Prompt to video with the pipeline folder ``model.path``; returns the written file."""
    import torch

    from vidpar.cli.validation_generate import check_prompt_request
    from vidpar.distributed.telemetry import format_summary, summarize
    from vidpar.pipelines.pipeline_generator import DiffusersPipelineGenerator

    parallel = build_layout(conf.parallel)
    request = check_prompt_request(conf, parallel)
    print(f"vidpar: generating from {conf.model.path} with {parallel.describe()}")
    with DiffusersPipelineGenerator(
        conf.model.path,
        parallel=parallel,
        dtype=getattr(torch, conf.model.dtype),
        text_encoder_offload=conf.model.text_encoder_offload,
    ) as generator:
        generator.generate(**request, return_frames=False)  # the worker writes the file
        records = generator.last_records
    if conf.telemetry and records:
        print("Communication summary (rank 0, generation):\n" + format_summary(summarize(records)))
    print(f"vidpar: wrote {conf.output}")
    return [Path(conf.output)]


def run(conf: DictConfig) -> list[Path]:
    """Generate as ``conf`` says; returns the written files."""
    # Imported here, not with the module: `vidpar-generate --help` needs no torch.
    from vidpar.cli.validation_generate import (
        check_generate_request,
        check_generate_resources,
        find_checkpoint,
        read_checkpoint_model,
    )
    from vidpar.distributed.telemetry import format_summary, summarize
    from vidpar.pipelines.generator import VideoGenerator
    from vidpar.pipelines.video_io import write_video

    os.environ.setdefault("WANDB_MODE", "offline")
    if conf.model.path is not None:
        return run_prompts(conf)
    parallel = build_layout(conf.parallel)
    trust = bool(conf.get("trust_checkpoint", False))
    checkpoint = find_checkpoint(conf.checkpoint, conf.search_dir, trust)
    if conf.checkpoint is None:
        print(
            f"vidpar: no checkpoint= given: using the last training run under "
            f"{conf.search_dir}/, {checkpoint.parent.parent} (its checkpoints/last.ckpt)"
        )
    # Everything is checked here, before the generator starts its workers.
    weights, dit_config, data_info = read_checkpoint_model(checkpoint, parallel, trust)
    labels, shape = check_generate_request(conf, dit_config, data_info)
    check_generate_resources(conf, dit_config, parallel, labels, shape)
    _, num_frames, height, width = shape
    print(f"vidpar: generating from {checkpoint} with {parallel.describe()}")
    with VideoGenerator(dit_config, weights, parallel=parallel, data_info=data_info) as generator:
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


def worker_imports(conf: DictConfig) -> tuple[str, ...]:
    """What a generation's workers import: torch and vidpar's models and pipelines (not
    Lightning), and diffusers' model and text-encoder code for a pipeline folder."""
    from vidpar.executor.start_method import PRELOAD_IF_IMPORTED

    pipeline = PRELOAD_IF_IMPORTED if conf.model.path is not None else ()
    return ("torch", "vidpar.pipelines", "vidpar.models", *pipeline)


main = console_command("generate", run, worker_imports)

if __name__ == "__main__":
    main()
