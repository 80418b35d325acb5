"""Join the ranks of an MPI job into one tensor-parallel engine (the offline `LLM` under
`mpiexec -n N`): every rank holds a shard, rank 0 leads."""

from __future__ import annotations

import atexit

from ..errors import InvalidRequestError
from ..model.tensor_parallel import TensorParallel
from ..model.tensor_shard import TensorShard
from .bringup import init_data_plane
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
