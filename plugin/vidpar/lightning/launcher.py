"""The strategy's launcher: the Executor starts the Trainer's worker processes.

On one machine, ``fit``/``validate``/``test``/``predict`` run in worker processes started by
:class:`~vidpar.executor.Executor` (the same code path as inference); results and the
trained weights come back to the main process as with Lightning's spawn launcher. Under
torchrun or SLURM the strategy uses no launcher: every process is already a worker.

While ``fit`` runs (with the strategy's ``checkpoint_on_interrupt``), ``SIGTERM`` and the
first Ctrl-C in this process become a stop request to every worker, which saves a
checkpoint at the end of the current step (:mod:`vidpar.lightning.supervision`); a second
Ctrl-C stops every worker at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from typing import TYPE_CHECKING, Any

import torch

# Private Lightning names, on purpose: the launcher must behave exactly like Lightning's
# spawn launcher (its main-guard check, global-state snapshot, worker output record and
# the base class whose result hand-over it extends); Lightning has no public launcher API.
from lightning.pytorch.strategies.launchers.multiprocessing import (
    _check_missing_main_guard,
    _GlobalStateSnapshot,
    _MultiProcessingLauncher,
    _WorkerOutput,
)
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed.tensor import DTensor

from vidpar.distributed.full_weights import full_state_dict
from vidpar.executor import Executor, RemoteError, WorkerDiedError
from vidpar.lightning.supervision import TrainingInterrupted, signal_name

if TYPE_CHECKING:
    from datetime import timedelta

    from lightning.pytorch.strategies import ParallelStrategy

    from vidpar.config import ParallelConfig

    class LaunchedStrategy(ParallelStrategy):
        """What the launcher reads of :class:`vidpar.lightning.strategy.VidParStrategy`
        (declared here, so that the launcher and the strategy do not import each other)."""

        parallel: ParallelConfig
        communicator: str
        heartbeat_timeout_s: float | None
        checkpoint_on_interrupt: bool
        _timeout: timedelta | None


class VidParLauncher(_MultiProcessingLauncher):
    """Runs the Trainer's function in one Executor worker per device."""

    def __init__(self, strategy: LaunchedStrategy) -> None:
        super().__init__(strategy, start_method="spawn")

    def launch(self, function, *args: Any, trainer=None, **kwargs: Any) -> Any:
        _check_missing_main_guard()
        if self._already_fit and trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            raise NotImplementedError(
                "Calling trainer.fit() twice on one Trainer with VidParStrategy is not supported: "
                "create a new Trainer and pass fit(ckpt_path=...)."
            )
        strategy = self._strategy
        global_states = _GlobalStateSnapshot.capture()
        if trainer is not None:
            # Loggers that run a service (W&B) create their run when pickled and attach to
            # it from the workers, which must therefore start after it: touch them now, as
            # Lightning's spawn launcher does by pickling before it spawns.
            for logger in trainer.loggers:
                _ = logger.experiment
        # The workers build the real layout's groups before the Trainer runs in them, as
        # inference workers do; the strategy then finds them in place.
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        graceful = fitting and strategy.checkpoint_on_interrupt
        executor = Executor(
            strategy.parallel,
            devices=[str(d) for d in strategy.parallel_devices],
            communicator=strategy.communicator,
            dist_timeout=strategy._timeout,
            heartbeat_timeout_s=strategy.heartbeat_timeout_s,
            catch_sigterm=graceful,
        )
        try:
            with executor, _stop_requests_on_signals(executor, graceful):
                outputs = executor.collective_rpc(
                    _run_trainer_function, self, trainer, function, args, kwargs, global_states
                )
        except RemoteError as err:
            interrupted = [e.exception for e in err.errors.values()]
            interrupted = [e for e in interrupted if isinstance(e, TrainingInterrupted)]
            if interrupted:
                raise interrupted[0] from None
            raise
        except WorkerDiedError as err:
            raise RuntimeError(
                f"vidpar worker rank {err.rank} died (exit code {err.exitcode}) while the Trainer "
                f"was running {function.__name__}; the other workers were stopped. Look above for "
                "its last output (out of memory is a common cause)."
            ) from err
        worker_output = outputs[0]
        if trainer is None:
            return worker_output
        self._already_fit |= trainer.state.fn == TrainerFn.FITTING
        self._recover_results_in_main_process(worker_output, trainer)
        return worker_output.trainer_results

    def _collect_rank_zero_results(self, trainer, results: Any) -> _WorkerOutput | None:
        """Like Lightning's, but the weights sent back are full tensors (tp shards gathered),
        so the main process holds a usable single-device model."""
        callback = trainer.checkpoint_callback
        best_model_path = getattr(callback, "best_model_path", None) if callback else None
        # Collective: tp shards gathered over their groups, FSDP2 DTensors over their mesh.
        state_dict = {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu()
            for k, v in full_state_dict(trainer.lightning_module).items()
        }
        if self._strategy.global_rank != 0:
            return None
        weights_path = None
        if trainer.state.fn == TrainerFn.FITTING:
            weights_path = os.path.join(tempfile.mkdtemp(), ".temp.ckpt")
            torch.save(state_dict, weights_path)
        extra = self.get_extra_results(trainer)
        return _WorkerOutput(best_model_path, weights_path, trainer.state, results, extra)

    def _recover_results_in_main_process(self, worker_output: _WorkerOutput, trainer) -> None:
        module = trainer.lightning_module
        if worker_output.weights_path is not None:
            # Layers built in configure_model exist only in the workers so far: build them
            # here too (no layout in this process, so at full size) and load strictly.
            precision = self._strategy.precision_plugin
            with precision.tensor_init_context():
                module.configure_model()
            precision.convert_module(module)
            state = torch.load(worker_output.weights_path, weights_only=True)
            module.load_state_dict(state, strict=True)
            os.remove(worker_output.weights_path)
        callback = trainer.checkpoint_callback
        if callback is not None and hasattr(callback, "best_model_path"):
            callback.best_model_path = str(worker_output.best_model_path or "")
        trainer.state = worker_output.trainer_state
        self.update_main_process_results(trainer, worker_output.extra)

    def get_extra_results(self, trainer) -> dict[str, Any]:
        """Lightning's extras plus the fit loop's progress (so ``trainer.global_step`` and
        ``current_epoch`` are right in the main process) and the last checkpoint written."""
        callback = trainer.checkpoint_callback
        return {
            **super().get_extra_results(trainer),
            "fit_loop": trainer.fit_loop.state_dict(),
            "last_model_path": getattr(callback, "last_model_path", None),
        }

    def update_main_process_results(self, trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        trainer.fit_loop.load_state_dict(extra["fit_loop"])
        callback = trainer.checkpoint_callback
        if extra["last_model_path"] is not None and hasattr(callback, "last_model_path"):
            callback.last_model_path = extra["last_model_path"]


@contextlib.contextmanager
def _stop_requests_on_signals(executor: Executor, enabled: bool):
    """While active (main thread only): the first ``SIGTERM`` or ``SIGINT`` asks every
    worker to save and stop; a later ``SIGINT`` raises ``KeyboardInterrupt`` (the Executor
    then kills the workers)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        if received:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        received.append(signum)
        executor.request_stop(signum)
        os.write(
            2,
            f"\nvidpar: {signal_name(signum)} received: saving a checkpoint at the end of "
            "this training step, then stopping (Ctrl-C again stops at once, without "
            "saving)\n".encode(),
        )

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_trainer_function(
    worker, launcher: VidParLauncher, trainer, function, args, kwargs, global_states
) -> Any:
    """Inside a worker: what Lightning's spawn launcher runs in each process."""
    # Private Lightning helpers, so a worker starts exactly as a spawned Lightning process:
    # thread count, and CPU tensors unshared from the parent's memory.
    from lightning.fabric.strategies.launchers.multiprocessing import _set_num_threads_if_needed
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies.launchers.multiprocessing import (
        _disable_module_memory_sharing,
    )

    global_states.restore()
    if isinstance(launcher._strategy.accelerator, CPUAccelerator):
        args, kwargs = _disable_module_memory_sharing((args, kwargs))
    _set_num_threads_if_needed(num_processes=launcher._strategy.num_processes)
    results = function(*args, **kwargs)
    if trainer is not None:
        results = launcher._collect_rank_zero_results(trainer, results)
    return move_data_to_device(results, "cpu") if results is not None else None
