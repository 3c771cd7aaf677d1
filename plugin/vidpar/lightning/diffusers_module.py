"""DiffusersFlowModule: flow-matching training of a diffusers video transformer (Wan,
SkyReels-V2, LTX-Video, HunyuanVideo, Mochi: the families whose plan has a
:class:`~vidpar.models.flow_forward.FlowForward`) under any vidpar layout, and the export
of its checkpoints back to a diffusers folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from vidpar.data.latents import LATENTS, NEGATIVE, PROMPT
from vidpar.lightning.module import (
    check_timestep_sampling,
    sample_cfg_dropout,
    sample_noise_and_time,
)
from vidpar.lightning.nonfinite import NonFiniteGuard, OnNonFinite, check_on_nonfinite
from vidpar.models import PLANS
from vidpar.models.flow_forward import FlowForward
from vidpar.models.pretrained import (
    TIMESTEP_SCALE,
    WEIGHTS,
    find_model_folder,
    load_pretrained,
    model_class,
    read_config,
)
from vidpar.nn.frozen_weights import MIXED_PRECISION_DTYPES, cast_frozen_weights_for_autocast
from vidpar.nn.lora_layers import LoraSettings, add_lora, check_lora
from vidpar.pipelines.flow_matching import flow_matching_loss, shift_timesteps

#: The diffusers classes DiffusersFlowModule trains: those whose plan says how their
#: forward is a flow-matching velocity.
TRAINED_FAMILIES = tuple(name for name, plan in PLANS.items() if not isinstance(plan.flow, str))


def flow_forward(folder: Path, config: dict[str, Any]) -> FlowForward:
    """The flow-matching forward of the model class in ``config``; raises ``ValueError``
    saying why a class is not trained, naming those that are."""
    from vidpar.models.parallelize import family_plan

    family = config["_class_name"]
    plan = family_plan(model_class(config))
    flow = plan.flow if plan is not None else "vidpar has no plan of it"
    if isinstance(flow, str):
        raise ValueError(
            f"{folder} holds a {family}: DiffusersFlowModule does not train it ({flow}); it "
            f"trains {', '.join(TRAINED_FAMILIES)}. vidpar.models.parallelize runs the other "
            f"families for inference ({', '.join(n for n in PLANS if n not in TRAINED_FAMILIES)})"
        )
    return flow


def class_prompt_embeds(
    num_classes: int, text_len: int, text_dim: int, seed: int = 0
) -> torch.Tensor:
    """Stand-in prompts for class-labelled clips: ``[num_classes + 1, text_len, text_dim]``,
    class ``k`` a fixed standard-normal embedding drawn from ``seed``, and the last row
    (the null class, for guidance) zeros. The transformer's own text projection learns to
    read them, so they need no training of their own."""
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn((num_classes, text_len, text_dim), generator=gen)
    return torch.cat([embeds, torch.zeros(1, text_len, text_dim)])


class DiffusersFlowModule(pl.LightningModule):
    """Trains a diffusers video transformer from a local folder with the rectified-flow
    objective of :mod:`vidpar.pipelines.flow_matching` (``x_t = (1 - t) x0 + t noise``,
    target ``noise - x0``), the model called as its family's plan says
    (:class:`~vidpar.models.flow_forward.FlowForward`: timestep ``1000 t`` for Wan,
    SkyReels-V2, LTX-Video and HunyuanVideo, Mochi's inverted one, LTX's latents as tokens,
    the inputs a latents folder does not hold filled as the pipelines do).

    ``path`` is a diffusers model folder, or a pipeline folder whose ``subfolder`` (default
    ``transformer``) is one; only its config is read here. :meth:`configure_model` loads the
    weights under the strategy's layout and calls :func:`vidpar.models.parallelize`, so each
    rank keeps its tp shards under diffusers' parameter names (checkpoints reshard, and
    :func:`export_diffusers` writes a folder diffusers loads).

    Batches are a latents folder's (:class:`~vidpar.data.LatentsDataset`: ``latents``,
    ``prompt_embeds``, ``negative_prompt_embeds``) or the moving-shape clips (``video``,
    ``label``), whose classes are prompted by :func:`class_prompt_embeds` (``class_text_len``
    tokens, seeded by ``seed``; ``class_names`` says how many classes). With probability
    ``cfg_dropout`` a sample trains on its negative prompt (zeros when it has none; the
    null class for clips) so classifier-free guidance works. Flow times follow
    ``timestep_sampling`` (``uniform`` or ``logit_normal``), then ``timestep_shift``
    (:func:`~vidpar.pipelines.shift_timesteps`). Noise, times and dropout are functions of
    (seed, step, sample index): every layout trains on the same values.
    ``gradient_checkpointing`` recomputes each block in the backward pass; ``on_nonfinite``
    is what a NaN or infinite loss or gradient does (:class:`~vidpar.lightning.NonFiniteGuard`).

    ``lora`` (a :class:`~vidpar.nn.lora_layers.LoraSettings` or a mapping of its fields:
    ``rank``, ``alpha``, ``targets``, ``dropout``) trains low-rank adapters on the frozen
    transformer instead of its weights, under any layout (:func:`~vidpar.nn.lora_layers.add_lora`
    after :func:`~vidpar.models.parallelize`). Targets and ranks are checked against the
    model's config here, before any process starts. The module's state (``state_dict``,
    hence its checkpoints) is then the adapters alone: the base is the model folder's,
    unchanged; :func:`~vidpar.lightning.export_lora` writes a checkpoint's adapters as a
    diffusers LoRA file. Under a mixed precision (``bf16-mixed``, ``16-mixed``) the frozen
    linears' and convolutions' weights are held in autocast's dtype, which computes the
    same numbers in half their memory (:mod:`vidpar.nn.frozen_weights`); the adapters keep
    their float32 master copy.
    """

    def __init__(
        self,
        path: str | None = None,
        subfolder: str | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        cfg_dropout: float = 0.1,
        seed: int = 0,
        timestep_sampling: str = "uniform",
        timestep_shift: float = 1.0,
        gradient_checkpointing: bool = False,
        class_text_len: int = 8,
        class_names: list[str] | None = None,
        video_shape: list[int] | None = None,
        on_nonfinite: OnNonFinite = "raise",
        lora: LoraSettings | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_on_nonfinite(on_nonfinite)
        self.lora = LoraSettings.of(lora)
        check_timestep_sampling(timestep_sampling)
        self.folder = find_model_folder(path, subfolder)
        self.transformer_config = read_config(self.folder)
        self.flow = flow_forward(self.folder, self.transformer_config)
        channels = self.in_channels
        if video_shape is not None and channels is not None and video_shape[0] != channels:
            raise ValueError(
                f"the data gives samples of shape {tuple(video_shape)} (C, T, H, W) with "
                f"{video_shape[0]} channels, but the transformer in {self.folder} takes "
                f"in_channels={channels}: use latents of that model (or, for the moving-shape "
                f"clips, a transformer with in_channels={video_shape[0]})"
            )
        if self.lora is not None:
            with torch.device("meta"):  # names and shapes only, no weights
                check_lora(
                    model_class(self.transformer_config).from_config(self.transformer_config),
                    self.lora,
                )
            lora = self.lora.as_dict()  # plain values in the hyper-parameters
        self.save_hyperparameters()
        self.model: torch.nn.Module | None = None
        if class_names:
            text_dim = self.transformer_config[self.flow.text_dim]
            embeds = class_prompt_embeds(len(class_names), class_text_len, text_dim, seed)
        else:
            embeds = None
        self.register_buffer("class_embeds", embeds, persistent=False)

    @property
    def num_heads(self) -> int:
        """The transformer's attention heads (every rank of ulysses × tp needs one)."""
        return int(self.transformer_config["num_attention_heads"])

    @property
    def in_channels(self) -> int:
        """The channels of the latents (or clips) the transformer denoises."""
        return int(self.flow.latent_channels(self.transformer_config))

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from vidpar.models import parallelize

        model = parallelize(load_pretrained(self.folder))
        if self.lora is not None:
            add_lora(model, self.lora, self.hparams.seed)
            precision = None if self._trainer is None else str(self._trainer.precision)
            autocast_dtype = MIXED_PRECISION_DTYPES.get(precision)
            if autocast_dtype is not None:
                cast_frozen_weights_for_autocast(model, autocast_dtype)
        if self.hparams.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The velocity at flow time ``t`` (``[B]`` in [0, 1]) for prompt embeddings
        ``cond`` ``[B, L, D]``."""
        return self.flow(self.model, x, t, cond, TIMESTEP_SCALE)

    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x0, prompt, unconditional prompt)`` of a latents or a clips batch."""
        if LATENTS in batch:
            return batch[LATENTS], batch[PROMPT], batch[NEGATIVE]
        if self.class_embeds is None:
            raise ValueError(
                "this batch holds class-labelled clips, but the module was built without "
                "class_names: pass class_names (one per class) to prompt the classes"
            )
        x0, labels = batch["video"], batch["label"]
        cond = self.class_embeds[labels]
        return x0, cond, self.class_embeds[-1].expand_as(cond)

    def _loss(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        x0, cond, null = self._inputs(batch)
        hp, indices = self.hparams, batch["index"].cpu()
        noise, t = sample_noise_and_time(
            indices, step, tuple(x0.shape[1:]), hp.seed, hp.timestep_sampling
        )
        t = shift_timesteps(t, hp.timestep_shift)
        drop = sample_cfg_dropout(indices, step, hp.cfg_dropout, hp.seed).to(cond.device)
        cond = torch.where(drop[:, None, None], null.to(cond), cond)
        return flow_matching_loss(self.forward, x0, cond, t=t.to(x0), noise=noise.to(x0))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch, self.global_step)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self._loss(batch, step=-1 - batch_idx)  # fixed noise: comparable across epochs
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def configure_callbacks(self) -> list[pl.Callback]:
        """The non-finite guard (``on_nonfinite``: raise, skip_step or warn)."""
        return [NonFiniteGuard(self.hparams.on_nonfinite)]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            trainable, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )

    def _frozen(self) -> set[str]:
        """Names (in this module's state) of the frozen base weights under LoRA."""
        if self.lora is None or self.model is None:
            return set()
        return {f"model.{n}" for n, p in self.model.named_parameters() if not p.requires_grad}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Under LoRA, the adapters alone (checkpoints hold them and the optimizer's state:
        the frozen base is the model folder's)."""
        state = super().state_dict(*args, **kwargs)
        frozen = self._frozen()
        if not frozen:
            return state
        prefix = kwargs.get("prefix", "")
        for key in [k for k in state if k[len(prefix) :] in frozen]:
            del state[key]  # in place: also from a `destination` passed in
        return state

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
        """Under LoRA, a state without the frozen base weights loads (strictly: every
        adapter must be there)."""
        frozen = self._frozen()
        if not frozen:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k not in frozen]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"LoRA state mismatch: missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}"
            )
        return result


def export_diffusers(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base: str | os.PathLike | None = None,
    trust: bool = False,
) -> Path:
    """Write the transformer of a :class:`DiffusersFlowModule` checkpoint as a diffusers
    model folder (the base model's ``config.json`` and the trained weights) that
    ``from_pretrained`` and :class:`~vidpar.pipelines.DiffusersVideoGenerator` load.

    ``base`` is the folder trained from (default: the module's ``path`` and ``subfolder``
    as recorded in the checkpoint). Runs in one process; the checkpoint must be signed
    with this user's key unless ``trust`` (:mod:`vidpar.distributed.checkpoint_signing`)."""
    from vidpar.distributed.checkpoint import TRAINER_STATE, is_complete
    from vidpar.distributed.checkpoint_integrity import verify
    from vidpar.distributed.checkpoint_state import load_trainer_state
    from vidpar.distributed.full_weights import export_full_checkpoint

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if not is_complete(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} is not a complete vidpar checkpoint")
    verify(ckpt_dir, trust=trust)
    hparams = load_trainer_state(ckpt_dir / TRAINER_STATE).get("hyper_parameters", {})
    if "path" not in hparams:
        raise ValueError(f"{ckpt_dir} was not written by DiffusersFlowModule (no model path)")
    if hparams.get("lora"):
        raise ValueError(
            f"{ckpt_dir} holds LoRA adapters, not full weights: write them with "
            "vidpar.lightning.export_lora(ckpt_dir, out_dir), a file diffusers loads"
        )
    base = find_model_folder(base or hparams["path"], None if base else hparams.get("subfolder"))
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(base / "config.json", out_dir / "config.json")
    export_full_checkpoint(
        ckpt_dir, out_dir / WEIGHTS, prefix="model.", metadata={"format": "pt"}, trust=trust
    )
    return out_dir
