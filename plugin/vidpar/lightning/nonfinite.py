"""NonFiniteGuard: a NaN or infinite loss or gradient stops the run (or skips its step)."""

from __future__ import annotations

import logging
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor

from vidpar.lightning.supervision import last_checkpoint_path

logger = logging.getLogger(__name__)

OnNonFinite = Literal["raise", "skip_step", "warn"]
ON_NONFINITE = ("raise", "skip_step", "warn")


def check_on_nonfinite(value: str) -> OnNonFinite:
    """``value`` if it is one of :data:`ON_NONFINITE`, else a ``ValueError`` naming them."""
    if value not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {', '.join(ON_NONFINITE)}, got {value!r}")
    return value


class NonFiniteError(FloatingPointError):
    """The loss or the gradients of a training step were NaN or infinite."""


class NonFiniteGuard(pl.Callback):
    """Checks every training step's loss (before backward) and gradients (before the
    optimizer step) for NaN and infinity; every rank takes the same decision.

    ``on_nonfinite``: ``"raise"`` (default) stops the run with :class:`NonFiniteError`
    naming the step (``trainer.global_step``: optimizer steps taken before it) and the
    ranks; ``"skip_step"`` drops that step's gradients (``zero_grad(set_to_none=True)``,
    so the optimizer leaves the weights and its moments as they were) and goes on;
    ``"warn"`` logs and goes on. Each step costs one all-gather of two numbers and one
    device synchronisation. Under 16-bit mixed precision only the loss is checked (the
    loss scaler handles overflowing gradients).
    """

    def __init__(self, on_nonfinite: OnNonFinite = "raise") -> None:
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        self._bad_loss: torch.Tensor | None = None
        #: Steps skipped or warned about: ``(global_step, what, ranks)``.
        self.events: list[tuple[int, str, list[int]]] = []

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [
            p.grad
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        bad_loss = self._bad_loss if self._bad_loss is not None else torch.tensor(False)
        self._bad_loss = None
        # With a loss scaler (16-bit mixed precision), overflowing gradients are the
        # scaler's business: it skips those steps and lowers the scale.
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        bad_grads = torch.tensor(False) if scaled else _any_non_finite(grads)
        device = pl_module.device
        flags = torch.stack([bad_loss.to(device), bad_grads.to(device)]).float()
        gathered = trainer.strategy.all_gather(flags).reshape(-1, 2)
        per_rank = gathered.cpu().tolist()
        loss_ranks = [rank for rank, (loss, _) in enumerate(per_rank) if loss]
        grad_ranks = [rank for rank, (_, grad) in enumerate(per_rank) if grad]
        if not loss_ranks and not grad_ranks:
            return
        what, ranks = ("loss", loss_ranks) if loss_ranks else ("gradients", grad_ranks)
        where = (
            f"Non-finite {what} (NaN or inf) at training step {trainer.global_step} (epoch "
            f"{trainer.current_epoch}) on rank{'s' if len(ranks) > 1 else ''} "
            f"{', '.join(map(str, ranks))}"
        )
        if self.on_nonfinite == "raise":
            # Every rank is here, before the optimizer step: the weights, the optimizer and
            # the loops are those after the last step, so they are saved as `last`.
            path = last_checkpoint_path(trainer)
            if path is not None:
                trainer.save_checkpoint(path)  # collective, ends with a barrier
            saved = f"; saved {path} (the state before this step)" if path else ""
            raise NonFiniteError(
                f"{where}. The run stops here, before the optimizer step, so the weights and "
                f"the checkpoint are still finite{saved}. Look for bad samples in that step's "
                "batch or lower the learning rate; on_nonfinite=skip_step drops such steps."
            )
        self.events.append((trainer.global_step, what, ranks))
        if self.on_nonfinite == "skip_step":
            optimizer.zero_grad(set_to_none=True)
        if trainer.is_global_zero:
            action = "skipping the step" if self.on_nonfinite == "skip_step" else "going on"
            logger.warning("vidpar: %s; %s (on_nonfinite=%s)", where, action, self.on_nonfinite)


def _any_non_finite(grads: list[torch.Tensor]) -> torch.Tensor:
    """Whether any of ``grads`` (this rank's shards) holds a NaN or an infinity, as a 0-d
    bool tensor (no synchronisation): from one norm of them all (non-finite when any
    element is; a norm beyond float32's range counts too), element-wise for float16."""
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    half = [g for g in local if g.dtype == torch.float16]
    wide = [g for g in local if g.dtype != torch.float16]
    flags = [~torch.isfinite(g).all() for g in half]
    if wide:
        flags.append(~torch.isfinite(torch.nn.utils.get_total_norm(wide)))
    if not flags:
        return torch.tensor(False)
    return torch.stack([f.to(flags[0].device) for f in flags]).any()
