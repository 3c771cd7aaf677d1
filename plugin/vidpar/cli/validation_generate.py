"""``vidpar-generate``'s values, checked in the main process before the generator starts
its workers: the checkpoint (found, verified, a model the layout can run), the request
against that model, a prompt-to-video request against its pipeline folder, and the
output path and memory; each mistake is one :class:`UserError` paragraph that names the
override to change."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from vidpar.cli.hydra_setup import UserError
from vidpar.config import ParallelConfig
from vidpar.distributed.checkpoint_integrity import CorruptCheckpointError, verify
from vidpar.distributed.checkpoint_signing import UntrustedCheckpointError
from vidpar.distributed.checkpoint_store import resolve
from vidpar.models.plan import check_heads
from vidpar.nn.dit import DiTConfig

# The checkpoint ------------------------------------------------------------------------


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
    checkpoint: Path, parallel: ParallelConfig, trust: bool = False
) -> tuple[Path, DiTConfig, dict[str, Any]]:
    """The weights file, DiT config and training-data facts of ``checkpoint``, checked to
    be a model that ``VideoGenerator`` can sample with the layout ``parallel``."""
    from vidpar.pipelines.dit_weights import checkpoint_weights, read_model_info
    from vidpar.pipelines.generator import check_generatable

    try:
        weights = checkpoint_weights(checkpoint, trust=trust)
        dit_config, data_info = read_model_info(weights)
        check_generatable(dit_config)
    except (OSError, ValueError) as err:
        raise UserError(f"checkpoint={checkpoint} cannot be used: {err}.") from None
    try:
        parallel.check_heads(dit_config.num_heads)
    except ValueError as err:
        raise UserError(
            f"The checkpoint's model does not fit the layout: {err}. Pick a layout that "
            f"divides its {dit_config.num_heads} heads (e.g. parallel=cfg2 or parallel=single)."
        ) from None
    return weights, dit_config, data_info


# The request ---------------------------------------------------------------------------

#: The ``vidpar-generate`` override of each argument of ``VideoGenerator.generate``.
GENERATE_OVERRIDES = {"prompt_or_class": "labels"}


def generate_labels(labels: Any) -> list[int | str]:
    """``labels=[0,1]``, ``labels=[circle,square]`` or a single ``labels=2`` / ``labels=ring``
    as a list (a bare string is one class, not its letters)."""
    if isinstance(labels, ListConfig):
        return list(OmegaConf.to_container(labels))
    if isinstance(labels, list | tuple):
        return list(labels)
    return [labels]


def check_generate_request(
    conf: DictConfig, dit_config: DiTConfig, data_info: Mapping[str, Any]
) -> tuple[list[int], tuple[int, int, int, int]]:
    """Every argument of the generation ``conf`` asks for, checked against the model the
    checkpoint holds; returns the labels and video shape ``(C, T, H, W)``."""
    from vidpar.pipelines.generator import RequestError, plan_request

    try:
        return plan_request(
            dit_config,
            data_info,
            generate_labels(conf.labels),
            num_frames=conf.num_frames,
            height=conf.height,
            width=conf.width,
            steps=conf.steps,
            guidance_scale=conf.guidance_scale,
            seed=conf.seed,
            output=conf.output,
        )
    except RequestError as err:
        key = GENERATE_OVERRIDES.get(err.argument, err.argument)
        raise UserError(f"{key}={conf[key]} cannot be generated: {err}. Change {key}.") from None


def check_generate_resources(
    conf: DictConfig,
    dit_config: DiTConfig,
    parallel: ParallelConfig,
    labels: list[int],
    shape: tuple[int, int, int, int],
) -> None:
    """``output`` can be written (folder, permissions, free space for the video) and the
    sampling fits this machine's memory, before the generator starts its workers."""
    from vidpar.pipelines.preflight import check_generation

    preflight(
        check_generation,
        dit_config,
        len(labels),
        shape,
        parallel,
        guided=conf.guidance_scale != 1.0,
        output=conf.output,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )


def preflight(check, *args, **kwargs) -> None:
    """Run a :mod:`vidpar.pipelines.preflight` check (output path, memory) before the
    workers start; its failure becomes a :class:`UserError` naming what to change."""
    from vidpar.pipelines.preflight import PreflightError

    try:
        check(*args, **kwargs)
    except PreflightError as err:
        if err.argument == "output":
            raise UserError(f"{err}. Change output (e.g. output=samples.mp4).") from None
        raise UserError(f"{err}.") from None


# A prompt-to-video request -------------------------------------------------------------

#: The dtypes ``model.dtype`` names.
DTYPES = ("float32", "bfloat16", "float16", "float64")


def check_prompt_request(conf: DictConfig, parallel: ParallelConfig) -> dict[str, Any]:
    """Everything a prompt-to-video run asks for, checked before any worker starts; returns
    the keyword arguments of ``DiffusersPipelineGenerator.generate``."""
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
        check_heads(parallel, spec.transformer_config["num_attention_heads"])
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
        parallel,
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
