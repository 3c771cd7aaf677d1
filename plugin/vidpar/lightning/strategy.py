"""VidParStrategy: tensor, sequence, CFG and data parallelism for Lightning's Trainer."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

# Private Lightning helpers used as DDPStrategy uses them (no public equivalent): the
# "is torch.distributed up" check, and moving optimizer state to the root device.
from lightning.fabric.utilities.distributed import _distributed_is_initialized
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.parallel import DistributedDataParallel

from vidpar.config import PRESETS, ParallelConfig
from vidpar.distributed import checkpoint as vidpar_checkpoint
from vidpar.distributed import state as ps
from vidpar.distributed import telemetry
from vidpar.distributed.grad_clip import clip_grad_norm_
from vidpar.distributed.group import GroupCoordinator
from vidpar.distributed.telemetry import CollectiveRecord
from vidpar.executor.executor import HEARTBEAT_TIMEOUT_S
from vidpar.lightning.launcher import VidParLauncher
from vidpar.lightning.supervision import RunSupervisor
from vidpar.nn.attention import DistributedAttention
from vidpar.nn.linear import TensorParallelModule

_DEFAULT_TIMEOUT = timedelta(minutes=30)


class VidParStrategy(DDPStrategy):
    """Lightning strategy over vidpar's layout ``dp × cfg × ring × ulysses × tp``.

    ``setup_environment`` joins torch.distributed and builds every group, so
    ``LightningModule.configure_model`` can build tensor/sequence-parallel layers through
    :mod:`vidpar.distributed.state`'s getters and ``self.device_mesh``. Batches
    are sharded over dp only; gradients are summed over sp and averaged over dp by torch's
    DDP (``data_parallel="ddp"``) or FSDP2 (``"fsdp"``) on the dp × sp sub-group.
    Checkpoints are sharded directories written with ``torch.distributed.checkpoint``, each
    save a new version that replaces the previous one atomically
    (:mod:`vidpar.distributed.checkpoint_store`); ``checkpoint_keep_last`` versions of every
    checkpoint are kept (set by :class:`~vidpar.lightning.VidParModelCheckpoint`). A
    checkpoint is resumed only when signed with this user's key, or with
    ``trust_checkpoint`` (:mod:`vidpar.distributed.checkpoint_signing`).

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
        self.parallel_config = parallel if parallel is not None else ParallelConfig(**sizes)
        if data_parallel == "fsdp" and self.parallel_config.tp > 1:
            raise NotImplementedError(
                f"data_parallel='fsdp' with tp({self.parallel_config.tp}) > 1 is not supported "
                "yet: FSDP2 turns the tensor-parallel shards into DTensors of the dp × sp mesh "
                "and their tp layout would be lost in checkpoints. Use data_parallel='ddp' with "
                "tp, or fsdp with sp/dp."
            )
        self.data_parallel = data_parallel
        self.communicator = communicator
        self.telemetry = telemetry
        #: Versions of every checkpoint kept on disk (the current one included).
        self.checkpoint_keep_last = 1
        if heartbeat_timeout_s is not None and not heartbeat_timeout_s > 0:
            raise ValueError(
                f"heartbeat_timeout_s must be positive or None, got {heartbeat_timeout_s}"
            )
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.checkpoint_on_interrupt = checkpoint_on_interrupt
        self.trust_checkpoint = trust_checkpoint
        super().__init__(timeout=timeout, start_method="spawn", **ddp_kwargs)

    # Layout ------------------------------------------------------------------------

    def _checked_config(self) -> ParallelConfig:
        """The layout resolved against the processes the Trainer will run."""
        world = self.num_processes * self.num_nodes
        try:
            return self.parallel_config.resolve(world)
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
        self.parallel_config = self._checked_config()
        if self.cluster_environment.creates_processes_externally:
            self._launcher = None  # torchrun / SLURM: every process is already a worker
        else:
            self._launcher = VidParLauncher(self)

    def setup_environment(self) -> None:
        """Join torch.distributed and build the layout's state, unless the launcher's
        workers already did (then Lightning's own join is skipped too); under torchrun or
        SLURM, Lightning joins and the state is built here."""
        super().setup_environment()
        ps.init_distributed_environment()
        config = self._checked_config()
        if ps.model_parallel_is_initialized() and ps.get_parallel_config() != config:
            ps.destroy_model_parallel()
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(config, self.communicator)
        self.parallel_config = config
        if self.telemetry:
            telemetry.start_recording()
        if self.lightning_module is not None:
            self.lightning_module._device_mesh = self.device_mesh

    # Model -------------------------------------------------------------------------

    def setup(self, trainer) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        check_model_splits(self.lightning_module, self.parallel_state.config)
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
            self._clip_with_tp_shards()

    def _clip_with_tp_shards(self) -> None:
        """Under tp, Lightning's norm clipping would see each rank's shards alone, and tp
        ranks would clip by different factors: the precision plugin's norm clipping is
        replaced (on this strategy's own plugin instance; Lightning has no hook for it)
        by one over the global norm. FSDP2's DTensor gradients keep torch's clipping."""
        if self.parallel_state.config.tp == 1:
            return
        module = self.lightning_module

        def clip_grad_by_norm(optimizer, clip_val: float) -> None:
            parameters = list(self.precision_plugin.main_params(optimizer))
            clip_grad_norm_(module, parameters, float(clip_val))

        self.precision_plugin.clip_grad_by_norm = clip_grad_by_norm

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
        state = self.parallel_state
        replicas, dp_size = state.group("dp_sp"), state.config.dp
        if replicas.world_size == 1:
            return  # pure tensor parallelism: no gradient to reduce across replicas
        if self.data_parallel == "fsdp":
            self.model = _fully_shard(self.model, replicas, dp_size)
            return
        self.model = self._setup_model(self.model)
        self.model.register_comm_hook((replicas.device_group, dp_size), _sum_over_sp_mean_over_dp)

    def _setup_model(self, model: torch.nn.Module) -> DistributedDataParallel:
        device_ids = self.determine_ddp_device_ids()
        return DistributedDataParallel(
            module=model,
            device_ids=device_ids,
            process_group=self.parallel_state.group("dp_sp").device_group,
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

    # Checkpoints -------------------------------------------------------------------

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
            raise TypeError("VidParStrategy.save_checkpoint does not take storage_options")
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


def check_model_splits(module: torch.nn.Module, layout: ParallelConfig) -> None:
    """Refuse a model that would be silently mis-trained under ``layout``: under sp > 1
    gradients are summed over sp, right only when each sp rank holds its own tokens
    (a :class:`~vidpar.nn.DistributedAttention` over the layout's sp groups, or a diffusers
    transformer that :func:`vidpar.models.parallelize` prepared); under tp > 1
    a model without tp-sharded layers (:class:`~vidpar.nn.TensorParallelModule` over the
    layout's tp group) would be duplicated on every tp rank."""
    sp = layout.ulysses * layout.ring
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
            f"{name} has no sequence-parallel layer, but the layout {layout.describe()} "
            f"splits tokens over sp={sp}: every sp rank would run the whole model on the same "
            f"batch and the gradients, summed over sp, would be {sp}× too large. Build its "
            "attention from vidpar.nn.DistributedAttention inside configure_model (or call "
            "vidpar.models.parallelize on a diffusers transformer there), or train it data "
            "parallel (strategy='vidpar', or a layout with sp=1 and tp=1)."
        )
    if layout.tp > 1 and not any(
        isinstance(m, TensorParallelModule) and m.tp_group.world_size == layout.tp
        for m in module.modules()
    ):
        raise ValueError(
            f"{name} has no tensor-parallel layer, but the layout {layout.describe()} splits "
            f"the model over tp={layout.tp}: every tp rank would hold and train a full copy. "
            "Build its layers from vidpar.nn (ColumnParallelLinear, RowParallelLinear, ...) "
            "inside configure_model (or call vidpar.models.parallelize on a diffusers "
            "transformer there), or train it data parallel (strategy='vidpar', or a layout "
            "with sp=1 and tp=1)."
        )


def _sum_over_sp_mean_over_dp(state: tuple[dist.ProcessGroup, int], bucket):
    """DDP comm hook: every sp rank holds the gradient of its own tokens, so gradients are
    summed over sp and averaged over dp (DDP's default would also divide by sp). Each
    bucket is recorded as a ``dp_sp`` all-reduce when telemetry is on (host-timed, from
    issue to completion).

    No return annotation: DDP compares it to a type object, and this module's annotations
    are strings.
    """
    group, dp_size = state
    buffer = bucket.buffer()
    if dp_size > 1:
        buffer.div_(dp_size)
    recorder = telemetry.active_recorder()
    start = time.perf_counter()
    future = dist.all_reduce(buffer, group=group, async_op=True).get_future()

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        if recorder is not None:
            recorder.add(
                CollectiveRecord(
                    "all_reduce",
                    "dp_sp",
                    str(buffer.dtype).removeprefix("torch."),
                    buffer.numel() * buffer.element_size(),
                    dist.get_world_size(group),
                    time.perf_counter() - start,
                )
            )
        return fut.value()[0]

    return future.then(finish)


def _fully_shard(module: torch.nn.Module, replicas: GroupCoordinator, dp_size: int):
    """FSDP2 over the dp × sp replicas: shard each repeated block (the classes a model
    names in ``_no_split_modules``, as diffusers models do), each top-level child, then
    the root, so one block's weights are gathered at a time.

    Frozen children (an EMA copy, a frozen encoder) are units of their own too, so their
    weights are gathered when they run, not kept gathered with the root's."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = DeviceMesh.from_group(replicas.device_group, replicas.device.type)
    blocks = {n for m in module.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    for block in module.modules():
        if type(block).__name__ in blocks and any(True for _ in block.parameters()):
            fully_shard(block, mesh=mesh)
    for child in module.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(module, mesh=mesh)
    # Sum over sp, mean over dp: every FSDP unit divides by dp, not the whole replica group.
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(float(dp_size))
    return module


VidParStrategy.register_strategies(StrategyRegistry)
