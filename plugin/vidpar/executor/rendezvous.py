"""The rendezvous of an Executor's world, which no other host can reach.

The world runs on one host, so nothing of it needs to listen beyond the loopback interface:
the rendezvous store the Executor holds listens on a loopback address, and the workers tell
gloo and NCCL the loopback interface for their own sockets. (torchrun and SLURM worlds keep
their launcher's store and settings.)
"""

from __future__ import annotations

import ipaddress
import socket

import torch


def loopback_store(host: str) -> torch.distributed.TCPStore:
    """The rendezvous store of a single-host world, listening on ``host`` alone.

    TCPStore binds its own socket to every interface (IPv4 and IPv6) whatever the host it
    is given, so any host that reaches this one could read and write rendezvous keys. This
    one listens on a socket bound to the loopback address ``host`` (the OS picks the port,
    so no worker can lose a race for one), which the store then owns.
    """
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"master_addr={host!r}: the Executor's workers all run on this host, so its "
            "rendezvous store listens on a loopback address only; pass 127.0.0.1 or ::1"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.bind((host, 0))
        listener.listen(socket.SOMAXCONN)
        port = listener.getsockname()[1]
    except BaseException:
        listener.close()
        raise
    return torch.distributed.TCPStore(
        host,
        port,
        is_master=True,
        wait_for_workers=False,
        master_listen_fd=listener.detach(),
        use_libuv=True,
    )


def loopback_sockets_env() -> dict[str, str]:
    """``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME`` naming the loopback interface:
    gloo's and NCCL's own sockets otherwise listen on the address the host name resolves
    to (a network one on a cluster node). Empty where no interface has 127.0.0.1."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addresses):
            return {"GLOO_SOCKET_IFNAME": name, "NCCL_SOCKET_IFNAME": name}
    return {}
