"""Lightning integration: VidParStrategy (registered as ``vidpar`` and presets), its
launcher, callbacks (telemetry, checkpoints with versions kept, the non-finite guard, the
run supervisor: activity, save on interrupt; a step-based progress bar), a
ready-made video-diffusion LightningModule and one for diffusers' video transformers
(``DiffusersFlowModule``, ``export_diffusers`` and ``export_lora`` are imported lazily:
diffusers is an optional extra)."""

import warnings
from typing import Any

from vidpar.distributed.full_weights import export_full_checkpoint
from vidpar.lightning.callbacks import CollectiveTelemetry
from vidpar.lightning.model_checkpoint import VidParModelCheckpoint
from vidpar.lightning.module import VideoDiffusionModule
from vidpar.lightning.nonfinite import NonFiniteError, NonFiniteGuard
from vidpar.lightning.progress import StepProgressBar
from vidpar.lightning.strategy import VidParStrategy
from vidpar.lightning.supervision import RunSupervisor, TrainingInterrupted

# torch 2.13 deprecates pytree's LeafSpec, which Lightning's CombinedLoader still builds once
# per fit in every worker: Lightning's to change, and nothing a vidpar user can act on.
warnings.filterwarnings(
    "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
)
# torch 2.13 deprecates torch.distributed.nn.functional.all_gather, which Lightning's
# strategy.all_gather (metrics synced across ranks) calls: Lightning's to change too.
warnings.filterwarnings(
    "ignore",
    message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
    category=FutureWarning,
)

__all__ = [
    "CollectiveTelemetry",
    "DiffusersFlowModule",
    "NonFiniteError",
    "NonFiniteGuard",
    "RunSupervisor",
    "StepProgressBar",
    "TrainingInterrupted",
    "VidParModelCheckpoint",
    "VidParStrategy",
    "VideoDiffusionModule",
    "export_diffusers",
    "export_full_checkpoint",
    "export_lora",
]


def __getattr__(name: str) -> Any:
    if name in ("DiffusersFlowModule", "export_diffusers"):
        from vidpar.lightning import diffusers_module

        return getattr(diffusers_module, name)
    if name == "export_lora":
        from vidpar.lightning.lora_export import export_lora

        return export_lora
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
