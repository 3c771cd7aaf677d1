"""The strategy's checkpoint I/O: Lightning's checkpoint hooks as sharded DCP directories
(:mod:`vidpar.distributed.checkpoint`), written and read by every rank.

Lightning's ``CheckpointIO`` plugins write one file from rank 0 and never see the model
or its optimizers; a sharded save is collective and needs both, so the hooks are the
strategy's own, mixed into :class:`~vidpar.lightning.VidParStrategy` from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vidpar.distributed import checkpoint as vidpar_checkpoint


class ShardedCheckpoints:
    """Mixed into a Lightning strategy (before it in the bases): each save a new version
    of a sharded checkpoint directory that replaces the previous one atomically
    (``checkpoint_keep_last`` versions kept, set by
    :class:`~vidpar.lightning.VidParModelCheckpoint`); a load restores weights and
    optimizer states in place, after setup, when the checkpoint is signed with this user's
    key or ``trust_checkpoint`` is set."""

    #: Versions of every checkpoint kept on disk (the current one included).
    checkpoint_keep_last: int = 1
    #: Load checkpoints signed by another key, or not signed at all.
    trust_checkpoint: bool = False
    # Read from the Lightning strategy this is mixed into (with its ``broadcast``).
    lightning_module: Any
    optimizers: Any
    is_global_zero: bool

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        path = Path(self.broadcast(str(filepath)))
        checkpoint.pop("state_dict", None)
        checkpoint.pop("optimizer_states", None)
        vidpar_checkpoint.save_sharded(
            path,
            self.lightning_module,
            list(self.optimizers),
            checkpoint,
            keep_last=self.checkpoint_keep_last,
        )

    def load_checkpoint(
        self, checkpoint_path: str | Path, weights_only: bool | None = None
    ) -> dict:
        path = Path(self.broadcast(str(checkpoint_path)))
        return vidpar_checkpoint.load_sharded(
            path, self.lightning_module, list(self.optimizers), trust=self.trust_checkpoint
        )

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Weights were loaded in :meth:`load_checkpoint` already (sharded)."""

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Optimizer states were loaded in :meth:`load_checkpoint` already (sharded)."""

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return self.lightning_module.state_dict()

    def remove_checkpoint(self, filepath: str | Path) -> None:
        if self.is_global_zero:
            vidpar_checkpoint.remove(Path(filepath))
