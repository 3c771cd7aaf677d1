"""VidParStrategy: tensor, sequence, CFG and data parallelism for Lightning's Trainer."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import torch

# Private Lightning helpers used as DDPStrategy uses them (no public equivalent): the
# "is torch.distributed up" check, and moving optimizer state to the root device.
from lightning.fabric.utilities.distributed import _distributed_is_initialized
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn

from vidpar.config import PRESETS, ParallelConfig
from vidpar.distributed import state as ps
from vidpar.distributed import telemetry
from vidpar.executor.executor import HEARTBEAT_TIMEOUT_S
from vidpar.lightning.checkpoint_io import ShardedCheckpoints
from vidpar.lightning.grad_reduction import reduce_over_replicas
from vidpar.lightning.launcher import VidParLauncher
from vidpar.lightning.precision import with_tensor_parallel_clipping
from vidpar.lightning.supervision import RunSupervisor
from vidpar.nn.attention import DistributedAttention
from vidpar.nn.linear import TensorParallelModule

_DEFAULT_TIMEOUT = timedelta(minutes=30)


class VidParStrategy(ShardedCheckpoints, DDPStrategy):
    """Lightning strategy over vidpar's layout ``dp × cfg × ring × ulysses × tp``.

    The layout (``parallel``) is resolved against the Trainer's processes once, when the
    Trainer configures the strategy; ``setup_environment`` joins torch.distributed and
    builds every group (or finds them built by the launcher's workers, and raises if they
    are another layout's), so ``LightningModule.configure_model`` can build
    tensor/sequence-parallel layers through :mod:`vidpar.distributed.state`'s getters and
    ``self.device_mesh``. Batches are sharded over dp only; gradients are summed over sp
    and averaged over dp by torch's DDP (``data_parallel="ddp"``) or FSDP2 (``"fsdp"``) on
    the dp × sp sub-group (:mod:`vidpar.lightning.grad_reduction`); under tp, norm
    clipping takes the global norm (:mod:`vidpar.lightning.precision`).
    Checkpoints are sharded directories written with ``torch.distributed.checkpoint``, each
    save a new version that replaces the previous one atomically
    (:mod:`vidpar.lightning.checkpoint_io`); a checkpoint is resumed only when signed with
    this user's key, or with ``trust_checkpoint``
    (:mod:`vidpar.distributed.checkpoint_signing`).

    Liveness and interrupts (on one machine, where the launcher's Executor runs the
    workers): a worker silent for ``heartbeat_timeout_s`` seconds (``None``: never) fails the
    run with :class:`~vidpar.executor.WorkerStuckError`, naming its rank, training step and
    Python stacks; ``timeout`` is torch.distributed's collective timeout. With
    ``checkpoint_on_interrupt``, ``SIGTERM`` (in any process) and the first Ctrl-C save
    ``last.ckpt`` at the current step and make ``fit`` raise
    :class:`~vidpar.lightning.TrainingInterrupted`; a second Ctrl-C stops at once.
    """

    strategy_name = "vidpar"

    def __init__(
        self,
        parallel: ParallelConfig | None = None,
        *,
        tp: int | None = None,
        sp: int | None = None,
        ulysses: int | None = None,
        ring: int | None = None,
        cfg: int | None = None,
        dp: int | None = None,
        data_parallel: Literal["ddp", "fsdp"] = "ddp",
        communicator: str = "auto",
        timeout: timedelta | float | None = _DEFAULT_TIMEOUT,
        telemetry: bool = False,
        heartbeat_timeout_s: float | None = HEARTBEAT_TIMEOUT_S,
        checkpoint_on_interrupt: bool = True,
        trust_checkpoint: bool = False,
        **ddp_kwargs: Any,
    ) -> None:
        if data_parallel not in ("ddp", "fsdp"):
            raise ValueError(f"data_parallel must be 'ddp' or 'fsdp', got {data_parallel!r}")
        if isinstance(timeout, int | float):
            timeout = timedelta(seconds=timeout)
        sizes = {"tp": tp, "sp": sp, "ulysses": ulysses, "ring": ring, "cfg": cfg, "dp": dp}
        sizes = {k: v for k, v in sizes.items() if v is not None}
        if parallel is not None and sizes:
            raise ValueError(
                f"pass the layout either as parallel=ParallelConfig(...) or as sizes "
                f"({', '.join(f'{k}={v}' for k, v in sizes.items())}), not both"
            )
        #: The layout: as given until the Trainer configures the strategy, then resolved
        #: against its processes (the groups' own copy is ``parallel_state.parallel``).
        self.parallel = parallel if parallel is not None else ParallelConfig(**sizes)
        if data_parallel == "fsdp" and self.parallel.tp > 1:
            raise NotImplementedError(
                f"data_parallel='fsdp' with tp({self.parallel.tp}) > 1 is not supported "
                "yet: FSDP2 turns the tensor-parallel shards into DTensors of the dp × sp mesh "
                "and their tp layout would be lost in checkpoints. Use data_parallel='ddp' with "
                "tp, or fsdp with sp/dp."
            )
        self.data_parallel = data_parallel
        self.communicator = communicator
        self.telemetry = telemetry
        if heartbeat_timeout_s is not None and not heartbeat_timeout_s > 0:
            raise ValueError(
                f"heartbeat_timeout_s must be positive or None, got {heartbeat_timeout_s}"
            )
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.checkpoint_on_interrupt = checkpoint_on_interrupt
        self.trust_checkpoint = trust_checkpoint
        super().__init__(timeout=timeout, start_method="spawn", **ddp_kwargs)

    # Layout ------------------------------------------------------------------------

    def _resolved_layout(self) -> ParallelConfig:
        """The layout resolved against the processes the Trainer will run."""
        world = self.num_processes * self.num_nodes
        try:
            return self.parallel.resolve(world)
        except ValueError as err:
            raise ValueError(
                f"{err}. The Trainer runs {self.num_nodes} node(s) × {self.num_processes} "
                f"device(s) = {world} process(es): pass Trainer(devices=N) (and num_nodes) so "
                f"that N × nodes equals tp × sp × cfg × dp, or change the layout."
            ) from None

    @property
    def parallel_state(self) -> ps.ParallelState:
        """The layout's groups in this process (see :class:`vidpar.distributed.ParallelState`)."""
        return ps.get_parallel_state()

    @property
    def device_mesh(self):
        """The ``DeviceMesh`` with dims ``(dp, cfg, ring, ulysses, tp)``, made from the
        layout's own process groups."""
        return self.parallel_state.mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Shard data over dp only: every rank of one tp/sp group sees the same batch."""
        dp_group = self.parallel_state.group("dp")
        return {"num_replicas": dp_group.world_size, "rank": dp_group.rank_in_group}

    def _configure_launcher(self) -> None:
        """Called once by the Trainer, where the world size is known (devices × nodes): the
        one place the layout is resolved."""
        self.parallel = self._resolved_layout()
        if self.cluster_environment.creates_processes_externally:
            self._launcher = None  # torchrun / SLURM: every process is already a worker
        else:
            self._launcher = VidParLauncher(self)

    def setup_environment(self) -> None:
        """Join torch.distributed and build the layout's state, unless the launcher's
        workers already did (then Lightning's own join is skipped too); under torchrun or
        SLURM, Lightning joins and the state is built here. Groups already in place for
        another layout raise ``ValueError`` naming both (they are never rebuilt behind
        whoever built them)."""
        super().setup_environment()
        ps.init_distributed_environment()
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(self.parallel, self.communicator)
        elif (in_place := ps.get_parallel_state().parallel) != self.parallel:
            raise ValueError(
                f"VidParStrategy(parallel=...) is the layout {self.parallel.describe()}, but "
                f"this process's groups are already built for {in_place.describe()}. Pass the "
                "strategy the layout of the groups in place, or call "
                "vidpar.distributed.destroy_model_parallel() before the Trainer runs."
            )
        if self.telemetry:
            telemetry.start_recording()
        if self.lightning_module is not None:
            self.lightning_module._device_mesh = self.device_mesh

    # Model -------------------------------------------------------------------------

    def setup(self, trainer) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if self.parallel_state.parallel.tp > 1:
            # Norm clipping by the global norm of the tp shards (FSDP2, whose DTensor
            # gradients torch's clipping knows, never runs with tp).
            self.precision_plugin = with_tensor_parallel_clipping(
                self.precision_plugin, self.lightning_module
            )
        check_model_splits(self.lightning_module, self.parallel_state.parallel)
        if not any(isinstance(c, RunSupervisor) for c in trainer.callbacks):
            trainer.callbacks.append(RunSupervisor(self.checkpoint_on_interrupt))
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        # Unlike DDPStrategy, never broadcast every state from world rank 0: that would
        # overwrite tensor-parallel shards. Replicas are synchronised per group instead.
        self._sync_replicas(fitting)
        if fitting:
            self.configure_ddp()
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _sync_replicas(self, fitting: bool) -> None:
        """Make replicas equal: tp-replicated parameters from tp rank 0, and (when not
        fitting, where DDP would have done it) everything from the first dp × sp replica."""
        module = self.lightning_module
        state = self.parallel_state
        tp_group, replica_group = state.group("tp"), state.group("dp_sp")
        with torch.no_grad():
            for param in module.parameters():
                if getattr(param, "tensor_parallel_dim", None) is None:
                    tp_group.broadcast(param.data, src=0)
            if not fitting:
                for tensor in [*module.parameters(), *module.buffers()]:
                    replica_group.broadcast(tensor.data, src=0)

    def configure_ddp(self) -> None:
        """Gradients summed over sp and averaged over dp (nothing to do for one replica)."""
        self.model = reduce_over_replicas(
            self.model,
            self.parallel_state,
            self.data_parallel,
            self.determine_ddp_device_ids(),
            **self._ddp_kwargs,
        )

    # Collectives (Lightning's contracts, over the world) ----------------------------

    def barrier(self, name: str | None = None) -> None:
        if _distributed_is_initialized():
            self.parallel_state.group("world").barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        return self.parallel_state.group("world").broadcast_object(obj, src=src)

    # Teardown ----------------------------------------------------------------------

    def teardown(self) -> None:
        """Unwrap the model; the groups stay for later stages (``fit`` then ``test``) and for
        the launcher, which gathers the full weights after teardown."""
        if self.telemetry:
            telemetry.stop_recording()
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        """``vidpar`` (dp over every device), ``vidpar_<preset>`` for every layout in
        :data:`vidpar.config.PRESETS`, and ``vidpar_fsdp``."""
        entries = {"vidpar": {}, "vidpar_fsdp": {"data_parallel": "fsdp"}}
        entries |= {f"vidpar_{name}": sizes for name, sizes in PRESETS.items() if sizes}
        for name, kwargs in entries.items():
            if name in strategy_registry:
                continue
            description = "vidpar " + (", ".join(f"{k}={v}" for k, v in kwargs.items()) or "dp")
            strategy_registry.register(name, cls, description=description, **kwargs)


def check_model_splits(module: torch.nn.Module, parallel: ParallelConfig) -> None:
    """Refuse a model that would be silently mis-trained under the layout ``parallel``:
    under sp > 1 gradients are summed over sp, right only when each sp rank holds its own
    tokens (a :class:`~vidpar.nn.DistributedAttention` over the layout's sp groups, or a diffusers
    transformer that :func:`vidpar.models.parallelize` prepared); under tp > 1
    a model without tp-sharded layers (:class:`~vidpar.nn.TensorParallelModule` over the
    layout's tp group) would be duplicated on every tp rank."""
    sp = parallel.ulysses * parallel.ring
    name = type(module).__name__
    if sp > 1 and not any(
        getattr(m, "_vidpar_layout", None) is not None  # vidpar.models.parallelize's mark
        or (
            isinstance(m, DistributedAttention)
            and m.ulysses_group.world_size * m.ring_group.world_size == sp
        )
        for m in module.modules()
    ):
        raise ValueError(
            f"{name} has no sequence-parallel layer, but the layout {parallel.describe()} "
            f"splits tokens over sp={sp}: every sp rank would run the whole model on the same "
            f"batch and the gradients, summed over sp, would be {sp}× too large. Build its "
            "attention from vidpar.nn.DistributedAttention inside configure_model (or call "
            "vidpar.models.parallelize on a diffusers transformer there), or train it data "
            "parallel (strategy='vidpar', or a layout with sp=1 and tp=1)."
        )
    if parallel.tp > 1 and not any(
        isinstance(m, TensorParallelModule) and m.tp_group.world_size == parallel.tp
        for m in module.modules()
    ):
        raise ValueError(
            f"{name} has no tensor-parallel layer, but the layout {parallel.describe()} splits "
            f"the model over tp={parallel.tp}: every tp rank would hold and train a full copy. "
            "Build its layers from vidpar.nn (ColumnParallelLinear, RowParallelLinear, ...) "
            "inside configure_model (or call vidpar.models.parallelize on a diffusers "
            "transformer there), or train it data parallel (strategy='vidpar', or a layout "
            "with sp=1 and tp=1)."
        )


VidParStrategy.register_strategies(StrategyRegistry)
