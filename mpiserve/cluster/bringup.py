"""Start the data plane: rank 0 picks a rendezvous address and port and broadcasts them over
MPI; every rank then joins one torch.distributed group (NCCL with CUDA, gloo otherwise)."""

from __future__ import annotations

import datetime
import os
import socket
import sys

from .launch_env import launcher_local_rank, launcher_source


def node_local_rank(comm, env=None) -> int:
    """This rank's index among the ranks on its node (an MPI shared-memory split). MPI decides;
    a launcher that says otherwise (launch_env) gets a warning, since a device chosen from its
    variables before MPI was up would then differ from the one chosen here."""
    from mpi4py import MPI
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        rank = local.Get_rank()
    finally:
        local.Free()
    claimed = launcher_local_rank(env)
    if claimed is not None and claimed != rank:
        print(f"mpiserve: warning: rank {comm.Get_rank()} is local rank {rank} on "
              f"{socket.gethostname()} by MPI but {claimed} by "
              f"{launcher_source(env, local=True)}; using {rank}", file=sys.stderr, flush=True)
    return rank


def rendezvous_host(comm) -> str:
    """Loopback when all ranks share a host, else rank 0's host address."""
    single_host = len(set(comm.allgather(socket.gethostname()))) == 1
    if single_host:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    address = None
    if comm.Get_rank() == 0:
        address = "127.0.0.1" if single_host else socket.gethostbyname(socket.gethostname())
    return comm.bcast(address, root=0)


def init_data_plane(comm, timeout_s: float = 120.0) -> str:
    """Join the torch.distributed group; returns the backend name. Rank 0's store binds a port
    the system picks (no window in which another job could take it) and broadcasts it."""
    import torch
    import torch.distributed as dist
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(node_local_rank(comm) % torch.cuda.device_count())
    host, rank, size = rendezvous_host(comm), comm.Get_rank(), comm.Get_size()
    timeout = datetime.timedelta(seconds=timeout_s)
    store = (dist.TCPStore(host, 0, size, is_master=True, timeout=timeout, wait_for_workers=False)
             if rank == 0 else None)
    port = comm.bcast(store.port if store is not None else None, root=0)
    if store is None:
        store = dist.TCPStore(host, port, size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    return backend
