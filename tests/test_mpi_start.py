"""A rank whose MPI_Init never returns exits 1 after `--mpi-start-timeout` instead of waiting
for ever (a rank of a failed srun step spun in MPI_Init until it was killed).

The launcher is stood in for by a socket that accepts MPICH's PMI connection and never answers:
MPI_Init then blocks in its first PMI exchange."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from batch_jobs import MPISERVE, job_env

pytestmark = pytest.mark.mpi


def test_a_rank_stuck_in_mpi_init_exits_after_the_bound(tmp_path):
    (tmp_path / "in.jsonl").write_text("")
    with socket.socket() as silent_launcher:
        silent_launcher.bind(("127.0.0.1", 0))
        silent_launcher.listen()
        host, port = silent_launcher.getsockname()
        env = job_env(PMI_PORT=f"{host}:{port}", PMI_RANK="0", PMI_SIZE="2", PMI_ID="0")
        start = time.monotonic()
        done = subprocess.run(
            [str(MPISERVE), "run", "--input", str(tmp_path / "in.jsonl"),
             "--output", str(tmp_path / "out.jsonl"), "--mpi-start-timeout", "3"],
            env=env, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - start
    assert done.returncode == 1, done.stderr
    assert "Timeout (0:00:03)!" in done.stderr and "in _start_mpi" in done.stderr, done.stderr
    assert 3 <= took < 60


@pytest.mark.parametrize("bound", ["0", "-5", "soon"])
def test_a_bound_that_is_not_a_positive_number_is_refused_by_name(bound):
    done = subprocess.run([str(MPISERVE), "run", "--input", "in.jsonl", "--output", "out.jsonl",
                           "--mpi-start-timeout", bound], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert f"argument --mpi-start-timeout: '{bound}': use a number of seconds > 0" in done.stderr
