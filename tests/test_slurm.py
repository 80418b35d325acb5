"""The Slurm templates on a real one-node Slurm cluster (munged + slurmctld + slurmd started for
the session by tests/slurm_cluster.py, torn down at the end).

- the demo batch through launchers/slurm/mpiserve.sbatch completes with exit 0;
- `scancel --batch --signal=TERM` mid-run on a two-node job (both launchers): the job drains,
  exits 3, requeues itself and the restarted job completes the output, with the token ids of
  an uninterrupted mpiexec run (the one-node template has the same body, checked below);
- under mpiexec inside the allocation, launch_env's ranks agree with MPI's;
- launchers/slurm/mpiserve-serve.sbatch serves HTTP on the port it names, and drains and
  exits 3 on the time limit's signal.

Skipped, with the reason, where the daemons cannot exist (not root, packages missing:
launchers/slurm/install-test-slurm.sh installs them). Every wait is bounded; a failure prints
the daemons' logs and the job's log.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from batch_jobs import (
    REPO,
    count_lines,
    input_ids,
    read_records,
    reference_tokens,
    tokens_by_id,
    write_requests,
)
from netns_hosts import NetnsHosts
from slurm_cluster import FINAL_STATES, SlurmCluster, SlurmError

TEMPLATES = REPO / "launchers" / "slurm"
SBATCH = TEMPLATES / "mpiserve.sbatch"
SERVE_SBATCH = TEMPLATES / "mpiserve-serve.sbatch"     # a server: its own body, no requeue
DEMO_INPUT = REPO / "launchers" / "demo" / "requests.jsonl"
JOB_TIMEOUT_S = 300
BODY_MARKER = "# ---- the same in every template of launchers/slurm"


# ---- the templates themselves (no cluster needed) ---------------------------------------
def test_templates_parse_and_share_one_body():
    templates = sorted(set(TEMPLATES.glob("*.sbatch")) - {SERVE_SBATCH})
    assert {t.name for t in templates} >= {"mpiserve.sbatch", "mpiserve-multinode.sbatch",
                                           "mpiserve-gpu.sbatch"}
    bodies = set()
    for template in templates:
        text = template.read_text()
        for directive in ("--signal=B:TERM@120", "--requeue", "--open-mode=append"):
            assert f"#SBATCH {directive}" in text, f"{template.name} lacks {directive}"
        check = subprocess.run(["bash", "-n", str(template)], capture_output=True, text=True)
        assert check.returncode == 0, f"{template.name}: {check.stderr}"
        head, marker, body = text.partition(BODY_MARKER)
        assert marker, f"{template.name} lacks the common body marker"
        assert "#SBATCH" not in body, f"{template.name}: #SBATCH after the first command"
        bodies.add(body)
    assert len(bodies) == 1, "the templates' bodies differ; keep them the same"
    serve = SERVE_SBATCH.read_text()
    assert "#SBATCH --signal=B:TERM@120" in serve and "mpiserve_bin\" serve" in serve
    check = subprocess.run(["bash", "-n", str(SERVE_SBATCH)], capture_output=True, text=True)
    assert check.returncode == 0, f"{SERVE_SBATCH.name}: {check.stderr}"
    gpu = (TEMPLATES / "mpiserve-gpu.sbatch").read_text()
    assert "--gres=gpu" in gpu and "--gpus-per-task=1" in gpu
    for script in [REPO / "launchers" / "mpiserve-local", TEMPLATES / "install-test-slurm.sh"]:
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script.name}: {check.stderr}"


# ---- the cluster -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = SlurmCluster.unavailable()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    started = time.monotonic()
    try:
        cluster.start()
    except SlurmError as exc:
        pytest.fail(str(exc))
    cluster.start_seconds = time.monotonic() - started
    yield cluster
    cluster.stop()


def job_env(mpiserve_cache) -> dict:
    """What the job needs besides sbatch's exported environment: the test's model cache and
    this venv (the template activates it)."""
    return {"MPISERVE_CACHE": str(mpiserve_cache), "MPISERVE_VENV": sys.prefix,
            "OMP_NUM_THREADS": "1"}


def submit(slurm: SlurmCluster, workdir: Path, log: Path, *args, env: dict) -> int:
    return slurm.sbatch("-n", "3", f"--output={log}", "--job-name=mpiserve-test",
                        str(SBATCH), *map(str, args), cwd=workdir, env=env)


def diagnose(slurm: SlurmCluster, job_id: int | None, log: Path) -> str:
    parts = []
    if job_id is not None:
        try:
            parts.append(f"--- scontrol show job {job_id}\n" + slurm.scontrol("show", "job",
                                                                               str(job_id)))
        except (SlurmError, subprocess.TimeoutExpired) as exc:
            parts.append(f"--- scontrol show job {job_id} failed: {exc}")
    try:
        parts.append(f"--- job log {log.name}\n" + log.read_text(errors="replace")[-6000:])
    except OSError:
        parts.append(f"--- no job log at {log}")
    parts.append(slurm.logs())
    return "\n".join(parts)


def wait_job(slurm, job_id, log, timeout=JOB_TIMEOUT_S, until=None) -> dict:
    try:
        return slurm.wait_job(job_id, timeout, until=until)
    except (TimeoutError, SlurmError) as exc:
        text = diagnose(slurm, job_id, log)
        slurm.run("scancel", str(job_id), check=False)
        pytest.fail(f"{exc}\n{text}")


# ---- jobs ------------------------------------------------------------------------------------
def skip_without_pmi2(slurm: SlurmCluster, launcher: str) -> None:
    if launcher == "srun":
        plugins = slurm.run("srun", "--mpi=list", check=False)
        if "pmi2" not in plugins.stdout + plugins.stderr:
            pytest.skip("this Slurm has no mpi/pmi2 plugin")


@pytest.mark.parametrize("launcher", ["mpiexec", "srun"])
def test_demo_batch_through_the_sbatch_template(slurm, tmp_path, mpiserve_cache, launcher):
    """The template's default launcher (the venv's mpiexec) and its alternative (srun
    --mpi=pmi2, when this Slurm has the plugin)."""
    skip_without_pmi2(slurm, launcher)
    output, log = tmp_path / "demo-out.jsonl", tmp_path / "job.log"
    started = time.monotonic()
    job_id = submit(slurm, tmp_path, log, "--prefill", 1, "--decode", 1, "--router",
                    "balanced_pd", "--input", DEMO_INPUT, "--output", output.name,
                    env={**job_env(mpiserve_cache), "MPISERVE_LAUNCHER": launcher})
    info = wait_job(slurm, job_id, log)
    seconds = time.monotonic() - started
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"{info['JobState']} {info['ExitCode']}\n{diagnose(slurm, job_id, log)}"
    records = read_records(output)
    tokens = tokens_by_id(records)               # one record per custom_id, none an error
    assert sorted(tokens) == sorted(input_ids(DEMO_INPUT)), diagnose(slurm, job_id, log)
    assert all(tokens.values())
    assert f"mpiserve-sbatch[{job_id}]: finished with exit 0" in log.read_text()
    print(f"demo batch under sbatch ({launcher}): {seconds:.1f} s (cluster up in "
          f"{slurm.start_seconds:.1f} s)")


def requeue_cycle(slurm: SlurmCluster, tmp_path: Path, tmp_path_factory, env: dict,
                  *sbatch_options: str, script: Path = SBATCH) -> str:
    """Submit the request file, stop the job with the signal the time limit would send once
    it has written a few records, and check that it drains, requeues itself and completes
    with the uninterrupted run's token ids. Returns the job's log."""
    source = write_requests(tmp_path / "in.jsonl")
    reference = reference_tokens(source, tmp_path_factory.mktemp("reference"))
    output, log = tmp_path / "out.jsonl", tmp_path / "job.log"
    started = time.monotonic()
    job_id = slurm.sbatch(*sbatch_options, "-n", "3", f"--output={log}",
                          "--job-name=mpiserve-test", str(script), "--prefill", "1",
                          "--decode", "1", "--router", "balanced_pd", "--max-inflight", "1",
                          "--input", source.name, "--output", output.name, cwd=tmp_path,
                          env=env)

    # a few records written, then the stop the time limit would send (--signal=B:TERM)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while count_lines(output) < 3:
        state = slurm.job(job_id).get("JobState")
        if state in FINAL_STATES or time.monotonic() > deadline:
            pytest.fail(f"job {state} before its output had 3 lines\n"
                        f"{diagnose(slurm, job_id, log)}")
        time.sleep(0.2)
    slurm.run("scancel", "--batch", "--signal=TERM", str(job_id))
    signalled = time.monotonic()

    states = []

    def note(info):
        state = (info.get("JobState"), info.get("Restarts"))
        if not states or states[-1] != state:
            states.append(state)
        return info.get("JobState") in FINAL_STATES

    info = wait_job(slurm, job_id, log, until=note)
    seconds = time.monotonic() - started
    text = log.read_text(errors="replace")
    detail = f"states {states}\n{diagnose(slurm, job_id, log)}"
    assert "stopped by a signal" in text, detail
    assert "(exit 3); requeueing" in text, detail
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", detail
    assert info["Restarts"] == "1", detail
    assert ("PENDING", "1") in states, detail           # it went back to the queue
    assert text.count("]: start (restart ") == 2, detail

    tokens = tokens_by_id(read_records(output))          # exactly one record per custom_id
    assert sorted(tokens) == sorted(input_ids(source)), detail
    different = [key for key in reference if tokens[key] != reference[key]]
    assert not different, f"token ids differ from the uninterrupted run for {different}"
    print(f"requeue/resume under Slurm: {seconds:.1f} s in all, "
          f"{time.monotonic() - signalled:.1f} s from SIGTERM to completion; states {states}")
    return text


PROBE = """
import json, os, sys
from mpi4py import MPI
from mpiserve.cluster.bringup import node_local_rank
from mpiserve.cluster.launch_env import launcher_local_rank, launcher_rank, launcher_source
comm = MPI.COMM_WORLD
row = {"mpi": comm.Get_rank(), "local": node_local_rank(comm), "launcher": launcher_rank(),
       "launcher_local": launcher_local_rank(), "source": launcher_source(),
       "slurm_procid": os.environ.get("SLURM_PROCID")}
with open(os.path.join(sys.argv[1], f"rank{comm.Get_rank()}.json"), "w") as out:
    json.dump(row, out)
"""


def test_launch_env_agrees_with_mpi_inside_an_allocation(slurm, tmp_path, mpiserve_cache):
    """mpiexec inside sbatch: every rank inherits SLURM_PROCID of the batch step, so the
    launcher's own PMI_RANK must win (and node_local_rank's cross-check stay silent)."""
    script, log = tmp_path / "probe.sbatch", tmp_path / "probe.log"
    (tmp_path / "probe.py").write_text(PROBE)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    script.write_text(f"#!/bin/bash\n{mpiexec} -n $SLURM_NTASKS {sys.executable} "
                      f"{tmp_path / 'probe.py'} {tmp_path}\n")
    job_id = slurm.sbatch("-n", "3", f"--output={log}", str(script), cwd=tmp_path,
                          env=job_env(mpiserve_cache))
    info = wait_job(slurm, job_id, log, timeout=120)
    assert info["JobState"] == "COMPLETED", diagnose(slurm, job_id, log)
    assert "warning" not in log.read_text(), diagnose(slurm, job_id, log)
    rows = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(3)]
    for row in rows:
        assert row["launcher"] == row["mpi"] and row["source"] == "PMI_RANK", rows
        assert row["launcher_local"] == row["local"] == row["mpi"], rows
    assert {row["slurm_procid"] for row in rows} == {"0"}, rows   # why Slurm's comes last


# ---- two nodes -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def slurm_nodes(tmp_path_factory):
    """slurmctld on one network-namespace host, a slurmd on each of two others."""
    reason = SlurmCluster.unavailable() or NetnsHosts.unavailable()
    if reason:
        pytest.skip(reason)
    with NetnsHosts(3, names_resolve=True) as hosts:
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm-nodes"), hosts)
        try:
            cluster.start()
        except SlurmError as exc:
            pytest.fail(str(exc))
        yield cluster
        cluster.stop()


@pytest.mark.parametrize("launcher", ["mpiexec", "srun"])
def test_two_node_job_requeues_and_resumes(slurm_nodes, tmp_path, tmp_path_factory,
                                           mpiserve_cache, launcher):
    """sbatch -N 2 with the multinode template: the router and the prefill engine on one node,
    the decode engine on the other (KV crosses nodes), through drain, requeue and resume."""
    skip_without_pmi2(slurm_nodes, launcher)
    text = requeue_cycle(slurm_nodes, tmp_path, tmp_path_factory,
                         {**job_env(mpiserve_cache), "MPISERVE_LAUNCHER": launcher},
                         "-N", "2", script=TEMPLATES / "mpiserve-multinode.sbatch")
    assert "tasks per node 2,1" in text, text[-3000:]


def test_server_through_the_serve_template(slurm, tmp_path, mpiserve_cache):
    """The log names the node, port and tunnel; the server answers with the API key; the time
    limit's signal drains it and the job ends with exit 3."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "serve.log"
    env = {**job_env(mpiserve_cache), "MPISERVE_PORT": str(port), "MPISERVE_API_KEY": "k"}
    job_id = slurm.sbatch("-n", "3", f"--output={log}", "--job-name=mpiserve-serve-test",
                          str(SERVE_SBATCH), "--prefill", "1", "--decode", "1",
                          "--dashboard", "off", cwd=tmp_path, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while http_status(f"{base}/health") != 200:
        if time.monotonic() > deadline or slurm.job(job_id).get("JobState") in FINAL_STATES:
            slurm.run("scancel", str(job_id), check=False)
            pytest.fail(f"no healthy server on port {port}\n{diagnose(slurm, job_id, log)}")
        time.sleep(0.5)
    request = urllib.request.Request(
        f"{base}/v1/completions", method="POST", headers={"Authorization": "Bearer k"},
        data=json.dumps({"prompt": "The river", "max_tokens": 4, "temperature": 0}).encode())
    with urllib.request.urlopen(request, timeout=60) as answer:
        assert len(json.loads(answer.read())["choices"][0]["token_ids"]) == 4
    assert http_status(f"{base}/v1/models") == 401
    slurm.run("scancel", "--batch", "--signal=TERM", str(job_id))
    info = wait_job(slurm, job_id, log)
    text = log.read_text(errors="replace")
    assert f"ssh -N -L {port}:127.0.0.1:{port}" in text, diagnose(slurm, job_id, log)
    assert info["ExitCode"] == "3:0" and "finished with exit 3" in text, \
        diagnose(slurm, job_id, log)


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None
