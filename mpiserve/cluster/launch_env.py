"""What the launcher says about this process before MPI is initialized: its rank in the job and
its index among the ranks on its node, read from the environment that mpiexec, mpirun or srun
set. For log prefixes and early device choice; MPI itself stays the source of truth once it
is up (`bringup.node_local_rank`).

Each function takes an environment mapping (default `os.environ`) and is a pure function of it.
The MPI launchers' own variables come first and Slurm's last: an `mpiexec` or `mpirun` started
inside an sbatch allocation passes SLURM_PROCID/SLURM_LOCALID of the batch step (or of the
srun that started its per-node proxy) down to every rank unchanged, while the variables of the
launcher that actually started the process are exact. When srun itself starts the ranks it
sets PMI_RANK (pmi2) or PMIX_RANK (pmix) equal to SLURM_PROCID, so the order loses nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# (variable, who sets it), in the order they are trusted
RANK_VARIABLES = (
    ("OMPI_COMM_WORLD_RANK", "Open MPI mpirun"),
    ("PMI_RANK", "MPICH/Intel MPI hydra, srun --mpi=pmi2"),
    ("PMIX_RANK", "PMIx launchers, srun --mpi=pmix"),
    ("SLURM_PROCID", "srun"),
)
LOCAL_RANK_VARIABLES = (
    ("OMPI_COMM_WORLD_LOCAL_RANK", "Open MPI mpirun"),
    ("MPI_LOCALRANKID", "MPICH/Intel MPI hydra"),
    ("SLURM_LOCALID", "srun"),
)


def _first_int(env: Mapping[str, str], names) -> tuple[int, str] | None:
    for name, _ in names:
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value), name
    return None


def launcher_rank(env: Mapping[str, str] | None = None) -> int | None:
    """This process's rank in the job as its launcher set it, or None if no launcher did."""
    found = _first_int(os.environ if env is None else env, RANK_VARIABLES)
    return None if found is None else found[0]


def launcher_local_rank(env: Mapping[str, str] | None = None) -> int | None:
    """This process's index among the job's ranks on its node, or None if unknown."""
    found = _first_int(os.environ if env is None else env, LOCAL_RANK_VARIABLES)
    return None if found is None else found[0]


def launcher_source(env: Mapping[str, str] | None = None, local: bool = False) -> str | None:
    """The variable `launcher_rank` (or, with local=True, `launcher_local_rank`) reads, e.g.
    "PMI_RANK"; None if none is set."""
    names = LOCAL_RANK_VARIABLES if local else RANK_VARIABLES
    found = _first_int(os.environ if env is None else env, names)
    return None if found is None else found[1]
