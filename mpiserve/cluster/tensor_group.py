"""Join ranks into tensor-parallel engines: every rank of a group holds a shard, the group's
first rank leads. Two shapes: the offline `LLM` under `mpiexec -n N` (one group, every rank)
and `mpiserve run` (the groups of the job layout; rank 0 belongs to none)."""

from __future__ import annotations

import atexit

from ..errors import InvalidRequestError
from ..model.tensor_parallel import TensorParallel
from ..model.tensor_shard import TensorShard
from .bringup import init_data_plane
from .layout import JobLayout
from .step_plans import StepPlans


def join_world_group(size: int) -> tuple[TensorParallel, StepPlans]:
    """This rank's shard and the group's step plans, the group being every rank of the job."""
    import torch
    import torch.distributed as dist
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if comm.Get_size() != size:
        raise InvalidRequestError(f"tensor_parallel_size={size} needs a job of {size} ranks "
                                  f"(mpiexec -n {size}); this one has {comm.Get_size()}")
    if torch.cuda.is_available() and not dist.is_initialized():      # NCCL for GPU tensors
        init_data_plane(comm)
        atexit.register(dist.destroy_process_group)     # before mpi4py's MPI_Finalize
    shard = TensorShard(size, comm.Get_rank())
    return TensorParallel(shard, comm=comm.Dup()), StepPlans(comm.Dup())


def join_job_groups(comm, layout: JobLayout) -> tuple[TensorParallel, StepPlans | None] | None:
    """Collective over the whole job (torch.distributed already up): this rank's shard and its
    group's step plans (None for an engine of one rank); None on the router rank."""
    import torch.distributed as dist
    from mpi4py import MPI
    rank = comm.Get_rank()
    group = layout.group_of(rank)
    group_comm = comm.Split(MPI.UNDEFINED if group is None else group.lead, rank)
    torch_group = None
    if dist.get_backend() == "nccl":        # GPU tensors reduce over NCCL subgroups
        for other in layout.groups:         # new_group is collective: every rank, same order
            if other.size > 1:
                made = dist.new_group(list(other.ranks))
                torch_group = made if rank in other.ranks else torch_group
    if group is None:
        return None
    shard = TensorShard(group.size, rank - group.lead)
    if group.size == 1:
        return TensorParallel(shard), None
    return TensorParallel(shard, group_comm.Dup(), torch_group), StepPlans(group_comm)
