"""The text that ``vidpar-train --help`` and ``vidpar-generate --help`` start with (Hydra's
help follows it): the main overrides, and the parallel presets, recipes and config options
as shipped, read from :data:`~vidpar.config.PRESETS` and the package's config folders."""

from __future__ import annotations

import re
from pathlib import Path

from vidpar.config import DIMS, PRESETS, ParallelConfig
from vidpar.resources import CONFIG_DIR

#: Per command: what it does, examples, and its main overrides with what they do. Every
#: key named here is checked against the composed config by the tests.
COMMANDS: dict[str, tuple[str, list[str], list[tuple[str, str]]]] = {
    "train": (
        "vidpar-train: train a video diffusion transformer with composable tensor, sequence\n"
        "(Ulysses, Ring), CFG and data parallelism in PyTorch Lightning, set by Hydra overrides.",
        [
            "vidpar-train                                   the default recipe",
            "vidpar-train parallel=sp2 trainer.max_steps=50",
            "vidpar-train -m parallel=single,sp2            a sweep: a job and W&B run each",
            "vidpar-train ckpt_path=RUN/checkpoints/last.ckpt   resume an earlier run",
        ],
        [
            ("parallel=PRESET", "a layout below, or sizes: parallel.tp=2 parallel.sp=2 ..."),
            ("recipe=RECIPE", "a model, layout and trainer that go together (below)"),
            ("trainer.max_steps=N", "optimizer steps to train (-1: trainer.max_epochs)"),
            ("trainer.val_check_interval=N", "validate (and sample videos) every N steps"),
            ("trainer.log_every_n_steps=N", "log the loss (console, log file, logger)"),
            ("data.batch_size=N", "clips per step and data-parallel rank"),
            ("ckpt_path=DIR", "resume from a checkpoints/last.ckpt of an earlier run"),
            ("checkpoint.keep_last=N", "checkpoint versions kept"),
            ("checkpoint.every_n_minutes=M", "save last.ckpt every M minutes (30; null: off)"),
            ("trust_checkpoint=true", "resume from a checkpoint signed by another key"),
            ("seed=N", "weights, data and noise"),
        ],
    ),
    "generate": (
        "vidpar-generate: sample videos from a vidpar-train checkpoint, or from text with a\n"
        "diffusers pipeline folder, through the same parallel layouts (e.g. cfg2: the\n"
        "conditional and unconditional pass side by side).",
        [
            "vidpar-generate                                the last run under search_dir",
            "vidpar-generate checkpoint=RUN/checkpoints/last.ckpt labels=[0,1] steps=30",
            "vidpar-generate model.path=Wan2.1-T2V-1.3B-Diffusers prompt='a red fox' parallel=sp2",
        ],
        [
            ("parallel=PRESET", "a layout below, or sizes: parallel.cfg=2 parallel.sp=2 ..."),
            ("model.path=FOLDER", "a diffusers pipeline folder: generate from prompt= instead"),
            ("prompt=TEXT", "its prompt, or prompts: prompt=[TEXT,TEXT] (negative_prompt= too)"),
            ("image=FILE", "with an image-to-video folder: the first frame"),
            ("checkpoint=PATH", "a checkpoints/last.ckpt directory or a .safetensors file"),
            ("search_dir=DIR", "without checkpoint=: the last training run under DIR"),
            ("trust_checkpoint=true", "read a checkpoint directory signed by another key"),
            ("labels=[0,1,2,3]", "one clip per class label"),
            ("steps=N", "sampling steps"),
            ("guidance_scale=X", "classifier-free guidance"),
            ("num_frames=N", "frames (also height=, width=; null: as trained)"),
            ("output=FILE.mp4", "where the clips go (.gif beside it; with prompts .npy too)"),
            ("seed=N", "the noise"),
        ],
    ),
}

#: Config groups whose options the usage lists, per command.
GROUPS = {"train": ["model", "data", "trainer", "logger", "telemetry"], "generate": []}


def options(group: str) -> list[str]:
    """The options of a shipped config group."""
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def recipe_summary(path: Path, width: int = 90) -> str:
    """The first sentence of a recipe's opening comment, shortened to ``width``."""
    comment = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or line.endswith(":"):  # a command line follows
            comment.append(line.lstrip("#").strip().rstrip(":") if line.startswith("#") else "")
            break
        if "@package" not in line:
            comment.append(line.lstrip("#").strip())
    sentence = re.split(r"(?<=\.)\s", " ".join(comment).strip(), maxsplit=1)[0]
    return sentence if len(sentence) <= width else sentence[: width - 3].rsplit(" ", 1)[0] + " ..."


def _table(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(left) for left, _ in rows) + 2
    return [f"  {left:<{width}}{right}".rstrip() for left, right in rows]


def usage(command: str) -> str:
    """The usage of ``vidpar-<command>``."""
    summary, examples, overrides = COMMANDS[command]
    lines = [summary, "", "Usage:", *(f"  {e}" for e in examples), "", "Main overrides:"]
    lines += _table(overrides + [(f"{g}=...", "|".join(options(g))) for g in GROUPS[command]])
    lines += ["", f"Parallel presets (parallel=NAME; world = {' × '.join(DIMS)}):"]
    lines += _table([(name, ParallelConfig(**sizes).describe()) for name, sizes in PRESETS.items()])
    if command == "train":
        recipes = sorted((Path(CONFIG_DIR) / "recipe").glob("*.yaml"))
        lines += ["", "Recipes (recipe=NAME):"]
        lines += _table([(p.stem, recipe_summary(p)) for p in recipes])
    return "\n".join(lines) + "\n"
