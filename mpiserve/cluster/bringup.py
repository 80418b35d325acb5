"""Start the data plane: the ranks agree on an address of rank 0 they can all reach (checked
with a real connection, so an unreachable one fails in seconds, named), each opens its
doorbell (cluster.doorbell) on its own address there, rank 0 opens its store on a port it
broadcasts over MPI, and every rank joins one torch.distributed group (NCCL with CUDA, gloo
otherwise)."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time

from .doorbell import Doorbell, install
from .host_interfaces import local_report
from .launch_env import launcher_local_rank, launcher_source
from .rendezvous_choice import BindError, Rendezvous, choose_rendezvous

BIND_INTERFACE_VARIABLE = "MPISERVE_BIND_INTERFACE"
PROBE_TIMEOUT_S = 10.0      # for every rank to open a TCP connection to rank 0's address
PROBE_RETRY_S = 0.25


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


def rendezvous(comm, env=None) -> Rendezvous:
    """Where the ranks meet: rank 0's address that every rank can reach, and each rank's
    interface (rendezvous_choice decides from every rank's hostname and interfaces;
    --bind-interface / MPISERVE_BIND_INTERFACE overrides), checked by a real connection from
    every rank. Sets this rank's GLOO_SOCKET_IFNAME to its side of the choice unless the user
    set it. Raises BindError on every rank when there is no usable
    address or a rank cannot connect within PROBE_TIMEOUT_S."""
    env = os.environ if env is None else env
    reports = comm.allgather(local_report())
    choice = None
    if comm.Get_rank() == 0:
        try:
            choice = choose_rendezvous(reports, env.get(BIND_INTERFACE_VARIABLE) or None)
        except BindError as exc:
            choice = str(exc)
    choice = comm.bcast(choice, root=0)
    quiet = comm.Get_rank() != 0
    if isinstance(choice, str):
        raise BindError(choice, quiet)
    interface = choice.interfaces[comm.Get_rank()]
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    failures = probe_rendezvous(comm, choice.address, PROBE_TIMEOUT_S)
    if failures:
        raise BindError(f"rank 0's rendezvous address {choice.address} ({choice.reason}) is "
                        f"unreachable: {'; '.join(failures)}. Name the interface the nodes "
                        f"share with --bind-interface or {BIND_INTERFACE_VARIABLE}", quiet)
    return choice


def probe_rendezvous(comm, address: str, timeout_s: float) -> list[str]:
    """Rank 0 listens on `address`; every other rank connects within `timeout_s`. Returns, on
    every rank, one line per rank that could not (empty when all could)."""
    listener, problem = None, None
    if comm.Get_rank() == 0:
        try:
            listener = socket.create_server((address, 0), backlog=comm.Get_size())
        except OSError as exc:
            problem = f"rank 0 on {socket.gethostname()} cannot listen on it: {exc}"
    port = comm.bcast(listener.getsockname()[1] if listener is not None else None, root=0)
    if port is not None and comm.Get_rank() != 0:
        problem = _connect_within(address, port, timeout_s)
    problems = comm.allgather(problem)
    if listener is not None:
        listener.close()
    return [f"rank {rank}: {text}" for rank, text in enumerate(problems) if text]


def _connect_within(address: str, port: int, timeout_s: float) -> str | None:
    """None once a TCP connection to address:port succeeds; else why not, after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((address, port), timeout=max(0.1, left)):
                return None
        except OSError as exc:
            if time.monotonic() + PROBE_RETRY_S >= deadline:
                return (f"{socket.gethostname()} could not connect to {address}:{port} within "
                        f"{timeout_s:.0f} s ({exc or type(exc).__name__})")
        time.sleep(PROBE_RETRY_S)


def init_data_plane(comm, timeout_s: float = 120.0) -> str:
    """Join the torch.distributed group; returns the backend name. Rank 0's store binds a port
    the system picks (no window in which another job could take it) and broadcasts it."""
    import torch
    import torch.distributed as dist
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(node_local_rank(comm) % torch.cuda.device_count())
    choice, rank, size = rendezvous(comm), comm.Get_rank(), comm.Get_size()
    own = choice.own[rank]
    install(Doorbell.open(comm, None if own is None else own.address))
    host = choice.address
    timeout = datetime.timedelta(seconds=timeout_s)
    store = (dist.TCPStore(host, 0, size, is_master=True, timeout=timeout, wait_for_workers=False)
             if rank == 0 else None)
    port = comm.bcast(store.port if store is not None else None, root=0)
    if store is None:
        store = dist.TCPStore(host, port, size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    return backend
