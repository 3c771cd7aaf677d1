"""Lightning integration: VidParStrategy (registered as ``vidpar`` and presets), its
launcher, the telemetry callback and a ready-made video-diffusion LightningModule."""

from vidpar.distributed.checkpoint import export_full_checkpoint
from vidpar.lightning.callbacks import CollectiveTelemetry
from vidpar.lightning.module import VideoDiffusionModule
from vidpar.lightning.strategy import VidParStrategy

__all__ = [
    "CollectiveTelemetry",
    "VidParStrategy",
    "VideoDiffusionModule",
    "export_full_checkpoint",
]
