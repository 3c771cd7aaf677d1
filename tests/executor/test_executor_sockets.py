"""No other host can reach a live Executor world: the caller, the fork server and every
worker listen on loopback addresses (or Unix sockets) only, for inference and training."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from pathlib import Path

import lightning.pytorch as pl
import psutil
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from vidpar import ParallelConfig
from vidpar.executor import Executor, Worker
from vidpar.lightning import VidParStrategy

START = 120.0


def exposed_sockets(pid: int) -> list[str]:
    """The TCP listeners and unconnected UDP sockets of ``pid`` that are not on loopback."""
    found = []
    for conn in psutil.Process(pid).net_connections(kind="inet"):
        listening = conn.status == psutil.CONN_LISTEN or (
            conn.type == socket.SOCK_DGRAM and not conn.raddr
        )
        address = ipaddress.ip_address(conn.laddr.ip.split("%")[0])
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if listening and not address.is_loopback:
            found.append(f"pid {pid} listens on [{conn.laddr.ip}]:{conn.laddr.port}")
    return found


def _pids_of_the_world(worker: Worker, caller: int) -> list[int]:
    """This worker, the process that forked it (the fork server) and the caller."""
    return sorted({os.getpid(), os.getppid(), caller})


def _exposed(worker: Worker, caller: int) -> list[str]:
    return [s for pid in _pids_of_the_world(worker, caller) for s in exposed_sockets(pid)]


@pytest.mark.parametrize("init_distributed", [True, False], ids=["gloo-world", "env-only"])
def test_a_live_executor_listens_on_loopback_only(init_distributed):
    with Executor(
        ParallelConfig(dp=2),
        devices="cpu",
        init_distributed=init_distributed,
        startup_timeout=START,
    ) as ex:
        if not init_distributed:  # code that joins torch.distributed itself, through env://
            ex.collective_rpc(_join_through_env)
        exposed = ex.collective_rpc(_exposed, os.getpid())
        own = exposed_sockets(os.getpid())
        reaper = [p.pid for p in psutil.Process().children() if p.pid not in ex.pids]
    assert own == [] and exposed == [[], []], (own, exposed)
    assert all(exposed_sockets(pid) == [] for pid in reaper if psutil.pid_exists(pid))


def _join_through_env(worker: Worker) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")


def _all_reduce(worker: Worker) -> float:
    """An all-reduce over the world (NCCL sets up its communicator, sockets and all)."""
    from vidpar.distributed import state as ps

    tensor = torch.ones(1, device=worker.device)
    return ps.get_world_group().all_reduce(tensor).item()


@pytest.mark.gpu
def test_a_live_gpu_executor_listens_on_loopback_only():
    """NCCL's and gloo's sockets too, on a node whose host name resolves to a network
    address (they listen there unless told the interface)."""
    world = min(2, torch.cuda.device_count())
    with Executor(ParallelConfig(dp=world), startup_timeout=START) as ex:
        assert ex.collective_rpc(_all_reduce) == [float(world)] * world
        exposed = ex.collective_rpc(_exposed, os.getpid())
    print("host name resolves to", socket.gethostbyname(socket.gethostname()))
    assert exposed == [[]] * world, exposed


def _socket_interfaces(worker: Worker) -> list[str | None]:
    return [os.environ.get(k) for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")]


def test_gloo_and_nccl_are_told_the_loopback_interface_unless_the_caller_chose():
    """gloo and NCCL listen where the host name resolves to (a network address on a
    cluster node) unless told an interface."""
    (loopback,) = [
        name
        for name, addresses in psutil.net_if_addrs().items()
        if any(a.address == "127.0.0.1" for a in addresses)
    ]
    with Executor(
        ParallelConfig(),
        devices="cpu",
        init_distributed=False,
        env={"NCCL_SOCKET_IFNAME": "ib0"},
        startup_timeout=START,
    ) as ex:
        assert ex.collective_rpc(_socket_interfaces) == [[loopback, "ib0"]]


def test_a_non_loopback_master_addr_is_refused_before_any_worker_starts():
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ValueError, match=r"master_addr='0\.0\.0\.0'.*127\.0\.0\.1"):
        Executor(ParallelConfig(), devices="cpu", master_addr="0.0.0.0")
    started = {p.pid for p in psutil.Process().children(recursive=True)} - children
    assert not [p for p in started if psutil.pid_exists(p)]


class SocketsReportingModel(BoringModel):
    """At its first step each rank writes what its world exposes beyond loopback."""

    def __init__(self, out_dir: str, caller: int) -> None:
        super().__init__()
        self.out_dir, self.caller = out_dir, caller

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            pids = sorted({os.getpid(), os.getppid(), self.caller})
            exposed = [s for pid in pids for s in exposed_sockets(pid)]
            Path(self.out_dir, f"rank-{self.global_rank}.json").write_text(json.dumps(exposed))
        return super().training_step(batch, batch_idx)


def test_a_training_world_listens_on_loopback_only(tmp_path):
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=VidParStrategy(dp=2),
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(SocketsReportingModel(str(tmp_path), os.getpid()))
    reports = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert reports == [[], []], reports
