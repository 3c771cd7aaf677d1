"""How workers start: forked from a fork server, yet with the caller's environment,
working directory, output and start method as they are when the Executor starts (not as
they were when the server started); ``VIDPAR_START_METHOD`` chooses spawn instead."""

from __future__ import annotations

import ast
import atexit
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from vidpar import ParallelConfig
from vidpar.executor import Executor, Worker, WorkerDiedError
from vidpar.executor.start_method import (
    PRELOAD_IF_IMPORTED,
    SERVER_SETUP,
    START_METHOD_ENV,
    server_preload,
)

START = 120.0


def _start() -> Executor:
    return Executor(
        ParallelConfig(dp=2), init_distributed=False, devices="cpu", startup_timeout=START
    )


def _surroundings(worker: Worker) -> dict:
    print(f"hello from rank {worker.rank}", flush=True)
    return {
        "probe": os.environ.get("VIDPAR_TEST_PROBE"),
        "cwd": os.getcwd(),
        "children_start": mp.get_start_method(allow_none=True),
        "parent": os.getppid(),
        "sigterm": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
    }


def _leave_a_mark_at_exit(worker: Worker, folder: str) -> None:
    atexit.register(Path(folder, f"rank-{worker.rank}").write_text, "exit handlers ran")


def test_forked_workers_take_on_the_callers_state_at_their_start(tmp_path, monkeypatch, capfd):
    with _start():  # the fork server exists from here on
        pass
    monkeypatch.setenv("VIDPAR_TEST_PROBE", "set after the server started")
    monkeypatch.chdir(tmp_path)
    with _start() as executor:
        seen = executor.collective_rpc(_surroundings)
    assert all(s["parent"] != os.getpid() for s in seen)  # forked by the server
    assert [s["probe"] for s in seen] == ["set after the server started"] * 2
    assert [s["cwd"] for s in seen] == [str(tmp_path)] * 2
    assert [s["children_start"] for s in seen] == [mp.get_start_method(allow_none=True)] * 2
    out = capfd.readouterr().out  # the test's stdout now, not the server's
    assert "hello from rank 0" in out and "hello from rank 1" in out


def test_the_fork_server_outlives_a_sigterm_to_every_process(tmp_path):
    """SLURM's preemption signal reaches the server too: it must not end, or the caller
    would read every worker as dead."""
    with _start() as executor:
        (server,) = {s["parent"] for s in executor.collective_rpc(_surroundings)}
        os.kill(server, signal.SIGTERM)
        seen = executor.collective_rpc(_surroundings)
    assert [s["parent"] for s in seen] == [server] * 2
    assert all(s["sigterm"] for s in seen)  # workers take SIGTERM's default action again


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_until_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        assert time.monotonic() < deadline, f"pid {pid} still runs"
        time.sleep(0.02)


def test_losing_the_fork_server_fails_no_live_executor():
    """An OOM kill or a stray kill of the server used to fail every live Executor's next
    call with "worker rank 0 died (exit code 255)" while its workers lived on."""
    with _start() as executor:
        (server,) = {s["parent"] for s in executor.collective_rpc(_surroundings)}
        os.kill(server, signal.SIGKILL)
        _wait_until_gone(server)
        seen = executor.collective_rpc(_surroundings)  # its workers live on, orphaned
        assert executor.is_alive and [s["parent"] != server for s in seen] == [True] * 2
        with _start() as second:  # a new Executor starts a new server
            (new_server,) = {s["parent"] for s in second.collective_rpc(_surroundings)}
        assert new_server != server
        workers = list(executor.pids)
        os.kill(workers[1], signal.SIGKILL)  # a worker's death is still seen, at once
        with pytest.raises(WorkerDiedError, match="rank 1 died") as info:
            executor.collective_rpc(_surroundings, timeout=60.0)
        assert info.value.exitcode is None and "fork server that started it is gone" in str(
            info.value
        )
    for pid in workers:
        _wait_until_gone(pid, 10.0)


def test_a_forked_worker_runs_its_exit_handlers(tmp_path):
    with _start() as executor:
        executor.collective_rpc(_leave_a_mark_at_exit, str(tmp_path))
        assert list(tmp_path.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-0", "rank-1"]


def test_spawn_is_a_choice(monkeypatch):
    monkeypatch.setenv(START_METHOD_ENV, "spawn")
    with _start() as executor:
        seen = executor.collective_rpc(_surroundings)
    assert [s["parent"] for s in seen] == [os.getpid()] * 2


def test_an_unknown_start_method_fails_before_any_worker_starts(monkeypatch):
    monkeypatch.setenv(START_METHOD_ENV, "fork")
    with pytest.raises(ValueError, match=r"VIDPAR_START_METHOD='fork': choose one of"):
        _start()


_EARLY = """
import psutil
from vidpar.executor.start_method import start_server_early
start_server_early()
print([" ".join(c.cmdline()) for c in psutil.Process().children()])
"""


@pytest.mark.parametrize("launcher", [None, "torchrun"])
def test_a_command_starts_the_server_before_its_set_up_unless_it_is_a_worker(launcher):
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "SLURM_NTASKS")}
    if launcher == "torchrun":
        env["LOCAL_RANK"] = "0"  # every process is a worker already: no server
    shown = subprocess.run(
        [sys.executable, "-c", _EARLY], env=env, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    servers = [c for c in ast.literal_eval(shown.stdout) if "multiprocessing.forkserver" in c]
    if launcher == "torchrun":
        assert servers == []
    else:
        (server,) = servers  # preloading everything a worker unpickles, signals first
        assert "['vidpar.executor.server_setup', 'torch', 'lightning.pytorch'" in server


def test_the_server_preloads_the_diffusers_model_code_the_caller_has_imported(monkeypatch):
    """Workers that build a diffusers model find its code imported (not seconds of imports
    each); a caller without it does not make the server import it."""
    import diffusers.models.transformers  # noqa: F401  (as a diffusers generator's caller has)

    assert server_preload(["torch"]) == [
        SERVER_SETUP,
        "torch",
        *(m for m in PRELOAD_IF_IMPORTED if m in sys.modules),
    ]
    assert "diffusers.models.transformers" in server_preload()
    for module in PRELOAD_IF_IMPORTED:
        monkeypatch.delitem(sys.modules, module, raising=False)
    assert server_preload(["torch"]) == [SERVER_SETUP, "torch"]


def test_a_server_on_a_host_with_gpus_preloads_only_what_leaves_cuda_alone(monkeypatch):
    """On an H100, workers forked from a server that had imported diffusers and
    transformers could not use CUDA; a server with torch, Lightning and vidpar could."""
    import diffusers.models.transformers  # noqa: F401
    import torch

    wanted = ["torch", "lightning.pytorch", "vidpar.models", "diffusers.models.transformers"]
    assert "diffusers.models.transformers" in server_preload(wanted)  # no GPU here
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # as on a GPU host
    assert server_preload(wanted) == [SERVER_SETUP, "torch", "lightning.pytorch", "vidpar.models"]
    assert not any(m.startswith(("diffusers", "transformers")) for m in server_preload())


_SERVER_ENV = """
import json, multiprocessing as mp, os
from vidpar import ParallelConfig
from vidpar.executor import Executor
from vidpar.executor.start_method import worker_context

def report(conn):
    conn.send({k: os.environ.get(k) for k in ("RANK", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")})

if __name__ == "__main__":
    with Executor(ParallelConfig(dp=2), devices="cpu", init_distributed=False):
        pass  # the fork server starts with the first worker
    ctx = worker_context()
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=report, args=(child,))
    proc.start()
    print(json.dumps(parent.recv()))
    proc.join()
"""


def test_the_fork_server_keeps_the_callers_environment_not_a_workers(tmp_path):
    """Other processes forked later (the tests' worlds) must not inherit rank 0's
    rendezvous: a dead store's port hung them."""
    script = tmp_path / "server_env.py"
    script.write_text(_SERVER_ENV)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "MASTER_PORT")}
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    shown = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout.splitlines()[-1]) == {
        "RANK": None,
        "MASTER_PORT": None,
        "TORCHELASTIC_USE_AGENT_STORE": None,
    }


_FROM_STDIN = """
from vidpar import ParallelConfig
from vidpar.executor import Executor

if __name__ == "__main__":
    with Executor(ParallelConfig(dp=2), devices="cpu", startup_timeout=120) as executor:
        print("ranks", executor.collective_rpc("ping"))
"""


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_a_script_on_standard_input_starts_its_workers(tmp_path, start_method):
    """``python - <<EOF`` used to fail with "worker rank 0 died (exit code 1) during
    start-up" and no word of why: each worker tried to run the file ``<stdin>`` again."""
    env = {**os.environ, START_METHOD_ENV: start_method}
    shown = subprocess.run(
        ["bash", "-c", f"{sys.executable} - <<'EOF'\n{_FROM_STDIN}\nEOF\n"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "ranks [0, 1]" in shown.stdout
