"""Rank discovery from the launcher's environment (mpiserve.cluster.launch_env): pure functions
of an env mapping, plus one real mpiexec job where it must agree with MPI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpiserve.cluster.launch_env import launcher_local_rank, launcher_rank, launcher_source

MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.mark.parametrize("env, rank, local, source", [
    ({}, None, None, None),
    ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1"}, 5, 1, "SLURM_PROCID"),          # srun
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, 3, 0,
     "OMPI_COMM_WORLD_RANK"),                                                    # mpirun
    ({"PMI_RANK": "2", "MPI_LOCALRANKID": "2"}, 2, 2, "PMI_RANK"),              # hydra
    ({"PMIX_RANK": "7"}, 7, None, "PMIX_RANK"),                                 # PMIx
    # srun --mpi=pmi2 / pmix: PMI_RANK / PMIX_RANK equal SLURM_PROCID, local from Slurm
    ({"PMI_RANK": "4", "SLURM_PROCID": "4", "SLURM_LOCALID": "0"}, 4, 0, "PMI_RANK"),
    ({"PMIX_RANK": "6", "SLURM_PROCID": "6", "SLURM_LOCALID": "2"}, 6, 2, "PMIX_RANK"),
    # mpiexec (hydra) inside an sbatch job: every rank inherits the batch step's
    # SLURM_PROCID=0/SLURM_LOCALID=0; hydra's own variables win
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "PMI_RANK": "2", "MPI_LOCALRANKID": "2"},
     2, 2, "PMI_RANK"),
    # Open MPI's mpirun inside an allocation, likewise
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "OMPI_COMM_WORLD_RANK": "9",
      "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, 9, 1, "OMPI_COMM_WORLD_RANK"),
    # a variable that is set but not a number is skipped, not fatal
    ({"PMI_RANK": "", "SLURM_PROCID": "1"}, 1, None, "SLURM_PROCID"),
    ({"OMPI_COMM_WORLD_RANK": "x", "PMI_RANK": " 3 "}, 3, None, "PMI_RANK"),
    ({"PMI_RANK": "-1"}, None, None, None),
])
def test_rank_from_environment(env, rank, local, source):
    assert launcher_rank(env) == rank
    assert launcher_local_rank(env) == local
    assert launcher_source(env) == source


def test_local_source_names_the_variable_read():
    env = {"SLURM_LOCALID": "0", "MPI_LOCALRANKID": "3"}
    assert launcher_local_rank(env) == 3
    assert launcher_source(env, local=True) == "MPI_LOCALRANKID"
    assert launcher_source({}, local=True) is None


def test_defaults_to_the_process_environment(monkeypatch):
    for name in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID",
                 "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMIX_RANK", "11")
    monkeypatch.setenv("SLURM_LOCALID", "4")
    assert launcher_rank() == 11
    assert launcher_local_rank() == 4


PROBE = """
import json, os, sys
from mpi4py import MPI
from mpiserve.cluster.bringup import node_local_rank
from mpiserve.cluster.launch_env import launcher_local_rank, launcher_rank
comm = MPI.COMM_WORLD
row = {"mpi": comm.Get_rank(), "local": node_local_rank(comm), "launcher": launcher_rank(),
       "launcher_local": launcher_local_rank()}
with open(os.path.join(sys.argv[1], f"rank{comm.Get_rank()}.json"), "w") as out:
    json.dump(row, out)
"""


@pytest.mark.mpi
@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec in this environment")
def test_launcher_agrees_with_mpi_under_mpiexec(tmp_path):
    """Under the environment's mpiexec the launcher's ranks are MPI's, and node_local_rank's
    cross-check stays silent."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI", "OMPI_"))}
    result = subprocess.run([str(MPIEXEC), "-n", "3", sys.executable, "-c", PROBE, tmp_path],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    rows = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(3)]
    assert [row["mpi"] for row in rows] == [0, 1, 2]
    for row in rows:
        assert row["launcher"] == row["mpi"]
        assert row["launcher_local"] == row["local"] == row["mpi"]      # one node
