"""Start the data plane: rank 0 picks a rendezvous address and port and broadcasts them over
MPI; every rank then joins one torch.distributed group (NCCL with CUDA, gloo otherwise)."""

from __future__ import annotations

import datetime
import os
import socket


def node_local_rank(comm) -> int:
    """This rank's index among the ranks on its node (an MPI shared-memory split)."""
    from mpi4py import MPI
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_rank()
    finally:
        local.Free()


def rendezvous_address(comm) -> tuple[str, int]:
    """Loopback when all ranks share a host, else rank 0's host address; a free port."""
    single_host = len(set(comm.allgather(socket.gethostname()))) == 1
    if single_host:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    choice = None
    if comm.Get_rank() == 0:
        address = "127.0.0.1" if single_host else socket.gethostbyname(socket.gethostname())
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
            choice = (address, sock.getsockname()[1])
    return comm.bcast(choice, root=0)


def init_data_plane(comm, timeout_s: float = 120.0) -> str:
    """Join the torch.distributed group; returns the backend name."""
    import torch
    import torch.distributed as dist
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(node_local_rank(comm) % torch.cuda.device_count())
    address, port = rendezvous_address(comm)
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}",
                            rank=comm.Get_rank(), world_size=comm.Get_size(),
                            timeout=datetime.timedelta(seconds=timeout_s))
    return backend
