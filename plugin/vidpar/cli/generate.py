"""``vidpar-generate``: sample class-conditioned videos from a trained checkpoint.

With no arguments it takes the ``checkpoints/last.ckpt`` of the last ``vidpar-train`` run
under ``outputs/`` (and says which), generates one clip per class through the Executor and writes
them side by side as an ``.mp4`` and a ``.gif``. With ``model.path=`` (a diffusers pipeline
folder) and ``prompt=`` it generates from text instead (:func:`run_prompts`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vidpar.cli.hydra_setup import UserError, build_layout, console_command, register
from vidpar.cli.validation import check_generate_request, check_generate_resources, preflight
from vidpar.config import ParallelConfig
from vidpar.distributed.checkpoint_integrity import CorruptCheckpointError, verify
from vidpar.distributed.checkpoint_signing import UntrustedCheckpointError
from vidpar.distributed.checkpoint_store import resolve
from vidpar.distributed.telemetry import format_summary, summarize
from vidpar.models.plan import check_heads
from vidpar.nn.dit import DiTConfig

register()


def find_checkpoint(checkpoint: str | None, search_dir: str, trust: bool = False) -> Path:
    """The checkpoint to use: the one given, or that of the last-started training run
    under ``search_dir`` that has one (runs started later without a complete checkpoint
    are named and skipped). A checkpoint directory is resolved to its current version, so
    it cannot change while it is read, and its files are checked against the signed
    manifest of its save (``trust``: signed by anyone, or not at all)."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.is_file():
            return path
        if not path.exists():
            raise UserError(
                f"checkpoint={checkpoint}: there is no such file or directory "
                f"({path.absolute()}). Pass an existing checkpoints/last.ckpt directory or "
                ".safetensors file."
            )
        if (resolved := resolve(path)) is not None:
            return _verified(resolved, trust)
        raise UserError(
            f"checkpoint={checkpoint} is neither a .safetensors file nor a complete vidpar "
            "checkpoint directory. Pass the checkpoints/last.ckpt directory of a vidpar-train "
            "run, or a file written by vidpar.lightning.export_full_checkpoint."
        )
    runs = training_runs(Path(search_dir))
    without = []
    for run in runs:
        found = resolve(run / "checkpoints" / "last.ckpt")
        if found is not None:
            if without:
                print(
                    f"vidpar: skipped {len(without)} later training run(s) without a complete "
                    f"checkpoints/last.ckpt (still training, or stopped before a save): "
                    f"{', '.join(map(str, without))}"
                )
            return _verified(found, trust)
        without.append(run)
    raise UserError(
        f"No training run under {Path(search_dir).resolve()} has a complete "
        f"checkpoints/last.ckpt: {', '.join(map(str, without))} (they may still be training, "
        "have stopped before their first save, or have run with trainer.max_steps=0). Pass "
        "checkpoint=PATH to use another checkpoint."
    )


def training_runs(search_dir: Path) -> list[Path]:
    """The vidpar-train run directories under ``search_dir`` (those with a ``train.log`` or
    ``checkpoints/``), the last started first, by the files Hydra writes when a job starts."""
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

    return sorted(runs, key=started, reverse=True)


def _verified(ckpt: Path, trust: bool) -> Path:
    try:
        verify(ckpt, trust=trust)
    except (CorruptCheckpointError, UntrustedCheckpointError) as err:
        raise UserError(str(err)) from None
    return ckpt


def read_checkpoint_model(
    checkpoint: Path, layout: ParallelConfig, trust: bool = False
) -> tuple[Path, DiTConfig, dict[str, Any]]:
    """The weights file, DiT config and training-data facts of ``checkpoint``, checked to
    be a model that ``VideoGenerator`` can sample with ``layout``."""
    from vidpar.pipelines.dit_weights import checkpoint_weights, read_model_info
    from vidpar.pipelines.generator import check_generatable

    try:
        weights = checkpoint_weights(checkpoint, trust=trust)
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


#: The dtypes ``model.dtype`` names.
DTYPES = ("float32", "bfloat16", "float16", "float64")


def check_prompt_request(conf: DictConfig, layout: ParallelConfig) -> dict[str, Any]:
    """Everything a prompt-to-video run asks for, checked before any worker starts; returns
    the keyword arguments of ``DiffusersPipelineGenerator.generate``."""
    import torch

    from vidpar.pipelines.pipeline_folder import read_pipeline_folder
    from vidpar.pipelines.preflight import check_diffusers_generation

    try:
        spec = read_pipeline_folder(conf.model.path)
    except (OSError, ValueError) as err:
        raise UserError(f"model.path={conf.model.path} cannot be used: {err}.") from None
    if conf.model.dtype not in DTYPES:
        raise UserError(f"model.dtype={conf.model.dtype} is not one of {', '.join(DTYPES)}.")
    if conf.model.text_encoder_offload not in ("none", "cpu"):
        raise UserError(
            f"model.text_encoder_offload={conf.model.text_encoder_offload}: pass none or cpu."
        )
    prompts = conf.prompt
    if prompts is None or (not isinstance(prompts, str) and not list(prompts)):
        raise UserError(f"model.path={conf.model.path} generates from text: pass prompt=TEXT.")
    prompts = prompts if isinstance(prompts, str) else [str(p) for p in prompts]
    negative = conf.negative_prompt
    if negative is not None and not isinstance(negative, str):
        negative = [str(n) for n in negative]
    try:
        check_heads(layout, spec.transformer_config["num_attention_heads"])
    except ValueError as err:
        raise UserError(
            f"The model does not fit the layout: {err}. Pick another parallel=."
        ) from None
    image = conf.image
    if image is None and spec.needs_image:
        raise UserError(
            f"model.path={conf.model.path} is a {spec.pipeline_class}: pass image=FILE (the "
            "first frame)."
        )
    if image is not None:
        from vidpar.pipelines.image_condition import read_image

        if not spec.takes_image:
            raise UserError(
                f"image={image}: model.path={conf.model.path} is a text-to-video "
                f"{spec.pipeline_class}; leave image= out."
            )
        try:
            read_image(image)
        except ValueError as err:
            raise UserError(f"{err}. Pass an image file to image=.") from None
    size = {
        "num_frames": conf.num_frames or 81,
        "height": conf.height or 480,
        "width": conf.width or 832,
    }
    try:
        num_frames, height, width = spec.video_size(**size)
    except ValueError as err:
        raise UserError(f"{err}.") from None
    if Path(conf.output).suffix not in (".mp4", ".gif", ".npy"):
        raise UserError(f"output={conf.output} must end in .mp4, .gif or .npy.")
    preflight(  # the output path and the memory, before the workers start
        check_diffusers_generation,
        spec.transformer_config,
        1 if isinstance(prompts, str) else len(prompts),
        spec.latent_shape(num_frames, height, width),
        (num_frames, height, width),
        layout,
        guided=conf.guidance_scale > 1.0,
        output=conf.output,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    return {
        "image": image,
        "prompt": prompts,
        "negative_prompt": negative,
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "steps": conf.steps,
        "guidance_scale": conf.guidance_scale,
        "seed": conf.seed,
        "max_sequence_length": conf.max_sequence_length,
        "output": conf.output,
        "fps": conf.fps,
    }


def run_prompts(conf: DictConfig) -> list[Path]:
    """Prompt to video with the pipeline folder ``model.path``; returns the written file."""
    import torch

    from vidpar.pipelines.pipeline_generator import DiffusersPipelineGenerator

    layout = build_layout(conf.parallel)
    request = check_prompt_request(conf, layout)
    print(f"vidpar: generating from {conf.model.path} with {layout.describe()}")
    with DiffusersPipelineGenerator(
        conf.model.path,
        parallel=layout,
        dtype=getattr(torch, conf.model.dtype),
        text_encoder_offload=conf.model.text_encoder_offload,
    ) as generator:
        generator.generate(**request)
        records = generator.last_records
    if conf.telemetry and records:
        print("Communication summary (rank 0, generation):\n" + format_summary(summarize(records)))
    print(f"vidpar: wrote {conf.output}")
    return [Path(conf.output)]


def run(conf: DictConfig) -> list[Path]:
    """Generate as ``conf`` says; returns the written files."""
    from vidpar.pipelines.generator import VideoGenerator
    from vidpar.pipelines.video_io import write_video

    os.environ.setdefault("WANDB_MODE", "offline")
    if conf.model.path is not None:
        return run_prompts(conf)
    layout = build_layout(conf.parallel)
    trust = bool(conf.get("trust_checkpoint", False))
    checkpoint = find_checkpoint(conf.checkpoint, conf.search_dir, trust)
    if conf.checkpoint is None:
        print(
            f"vidpar: no checkpoint= given: using the last training run under "
            f"{conf.search_dir}/, {checkpoint.parent.parent} (its checkpoints/last.ckpt)"
        )
    # Everything is checked here, before the generator starts its workers.
    weights, dit_config, data_info = read_checkpoint_model(checkpoint, layout, trust)
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
