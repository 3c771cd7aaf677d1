"""A diffusers pipeline folder as vidpar reads it: its components checked, its video sizes
rounded as the pipeline class rounds them, all before any worker starts.

A folder is what ``DiffusionPipeline.save_pretrained`` writes: ``model_index.json`` naming
the pipeline class and its components, one subfolder per component. vidpar runs the Wan
pipelines (:data:`SUPPORTED_PIPELINES`); nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The diffusers pipeline classes vidpar runs, and whether each takes an image.
SUPPORTED_PIPELINES: dict[str, bool] = {"WanPipeline": False, "WanImageToVideoPipeline": True}
#: Components every supported pipeline needs (``transformer`` or ``transformer_2`` too).
REQUIRED = ("tokenizer", "text_encoder", "vae", "scheduler")
#: diffusers' default maximum prompt length for Wan (``max_sequence_length``).
MAX_SEQUENCE_LENGTH = 512


def is_pipeline_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory with a ``model_index.json``."""
    return (Path(path).expanduser() / "model_index.json").is_file()


@dataclass(frozen=True)
class PipelineFolder:
    """The facts of a pipeline folder that sampling needs, read from its JSON files."""

    root: Path
    pipeline_class: str
    #: The subfolders of the components present (name → folder).
    components: dict[str, Path]
    transformer_config: dict[str, Any]
    vae_config: dict[str, Any]
    #: ``model_index.json``'s own settings (``boundary_ratio``, ``expand_timesteps``).
    settings: dict[str, Any]

    @property
    def takes_image(self) -> bool:
        """Image to video: the first frame conditions the video."""
        return SUPPORTED_PIPELINES[self.pipeline_class] or bool(self.settings["expand_timesteps"])

    @property
    def needs_image(self) -> bool:
        """Whether ``generate`` must get an image (I2V pipelines do; TI2V's is optional)."""
        return SUPPORTED_PIPELINES[self.pipeline_class]

    @property
    def transformers(self) -> tuple[str, ...]:
        """``transformer`` and/or ``transformer_2``, the ones present."""
        return tuple(n for n in ("transformer", "transformer_2") if n in self.components)

    @property
    def temporal_factor(self) -> int:
        return int(self.vae_config.get("scale_factor_temporal", 4))

    @property
    def spatial_factor(self) -> int:
        return int(self.vae_config.get("scale_factor_spatial", 8))

    def video_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The size the pipeline class will generate: ``num_frames`` rounded down to
        ``1 + k · scale_factor_temporal`` (with a warning, as diffusers rounds it); sizes the
        VAE and the patch cannot take raise ``ValueError`` naming the override."""
        for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        st = self.temporal_factor
        if (num_frames - 1) % st:
            rounded = max(num_frames // st * st + 1, 1)
            logger.warning(
                "num_frames=%d is not 1 + %d·k: rounded to %d, as diffusers' %s does",
                num_frames,
                st,
                rounded,
                self.pipeline_class,
            )
            num_frames = rounded
        patch = self.transformer_config["patch_size"]
        step = math.lcm(16, self.spatial_factor * patch[1], self.spatial_factor * patch[2])
        if height % step or width % step:
            raise ValueError(
                f"height={height}, width={width}: {self.pipeline_class} needs multiples of "
                f"{step} (16, and the VAE's factor {self.spatial_factor} × the patch "
                f"{patch[1]}); pass e.g. height={max(step, height // step * step)} "
                f"width={max(step, width // step * step)}"
            )
        return num_frames, height, width

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(channels, frames, height, width)`` of the latents of a video of that size."""
        channels = self.vae_config.get("z_dim", 16)
        return (
            channels,
            (num_frames - 1) // self.temporal_factor + 1,
            height // self.spatial_factor,
            width // self.spatial_factor,
        )


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{file} cannot be read as JSON: {err}") from None


def read_pipeline_folder(path: str | os.PathLike) -> PipelineFolder:
    """Check ``path`` is a pipeline folder vidpar runs, with every component it needs;
    ``ValueError``/``FileNotFoundError`` name what is wrong and what to pass instead."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"model path {root} does not exist (or is not a directory)")
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{root} is not a diffusers pipeline folder: it has no model_index.json. Pass "
            "the folder DiffusionPipeline.save_pretrained wrote (e.g. "
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers), or use DiffusersVideoGenerator for a "
            "transformer folder with precomputed prompt embeddings"
        )
    index = _read_json(index_file)
    cls = index.get("_class_name")
    if cls not in SUPPORTED_PIPELINES:
        raise ValueError(
            f"{index_file} names the pipeline {cls!r}, which vidpar cannot run; it runs "
            f"{', '.join(SUPPORTED_PIPELINES)}"
        )
    present = {
        name: root / name
        for name, entry in index.items()
        if not name.startswith("_") and isinstance(entry, list) and entry[0] is not None
    }
    needed = [
        *REQUIRED,
        *(("image_encoder", "image_processor") if SUPPORTED_PIPELINES[cls] else ()),
    ]
    missing = [n for n in needed if n not in present]
    if not any(n in present for n in ("transformer", "transformer_2")):
        missing.append("transformer")
    missing += [
        f"{n}/" for n, folder in present.items() if n not in missing and not folder.is_dir()
    ]
    if missing:
        raise FileNotFoundError(
            f"the pipeline folder {root} lacks {', '.join(missing)} (model_index.json names "
            f"the components; {cls} needs {', '.join(needed)} and a transformer)"
        )
    transformer = "transformer" if "transformer" in present else "transformer_2"
    config = _read_json(present[transformer] / "config.json")
    if config.get("_class_name") != "WanTransformer3DModel":
        raise ValueError(
            f"{present[transformer] / 'config.json'} is a {config.get('_class_name')!r}; "
            f"{cls} needs a WanTransformer3DModel"
        )
    settings = {
        "boundary_ratio": index.get("boundary_ratio"),
        "expand_timesteps": bool(index.get("expand_timesteps", False)),
    }
    if "transformer_2" in present and settings["boundary_ratio"] is None:
        raise ValueError(f"{index_file} has a transformer_2 but no boundary_ratio")
    vae_config = _read_json(present["vae"] / "config.json")
    return PipelineFolder(root, cls, present, config, vae_config, settings)
