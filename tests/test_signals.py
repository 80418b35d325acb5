"""Stopping a job with a signal and resuming it, under a plain mpiexec (no Slurm).

SIGTERM (or SIGINT through launchers/mpiserve-local) mid-run: rank 0 stops admitting, lets the
request in flight finish, exits 3; the same command again completes the file with one record
per custom_id and the tokens an uninterrupted run gives. SIGKILL of the whole job mid-run: no
written record is lost and no line is torn; the same command again completes the file.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from batch_jobs import (
    MPIEXEC,
    REPO,
    catches_signal,
    count_lines,
    descendants,
    finish,
    input_ids,
    kill_tree,
    log_text,
    rank_pids,
    read_records,
    reference_tokens,
    run_job,
    start_job,
    tokens_by_id,
    wait_for_lines,
    wait_gone,
    write_requests,
)

pytestmark = [pytest.mark.mpi, pytest.mark.slow,
              pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec in this environment")]

LAUNCHER = REPO / "launchers" / "mpiserve-local"


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    return write_requests(tmp_path_factory.mktemp("signals") / "in.jsonl")


@pytest.fixture(scope="module")
def reference(requests, tmp_path_factory):
    return reference_tokens(requests, tmp_path_factory.mktemp("reference"))


def assert_complete(output, requests, reference) -> None:
    tokens = tokens_by_id(read_records(output))          # one record per custom_id, no error
    assert sorted(tokens) == sorted(input_ids(requests))
    different = [key for key in reference if tokens[key] != reference[key]]
    assert not different, f"token ids differ from the uninterrupted run for {different}"


def test_sigterm_stops_with_3_and_a_rerun_completes(tmp_path, requests, reference):
    output = tmp_path / "out.jsonl"
    proc = start_job(requests, output)
    wait_for_lines(output, 2, proc)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = finish(proc)
    stopped_in = time.monotonic() - signalled
    log = log_text(proc)
    assert code == 3, f"exit {code} after SIGTERM\n{log}"
    assert "stopped by a signal" in log, log
    written = read_records(output)
    assert 2 <= len(written) < len(reference), log         # drained, did not run to the end
    assert stopped_in < 30, f"took {stopped_in:.1f} s to stop\n{log}"

    code, log = run_job(requests, output)
    assert code == 0, f"the resumed run exited {code}\n{log}"
    assert f"{len(written)} already in" in log, log
    assert_complete(output, requests, reference)


def test_sigterm_during_startup_stops_with_3(tmp_path, requests):
    """A stop that arrives while the ranks start (MPI init, model load, data plane) is kept
    until rank 0 can act on it: nothing is admitted and the job exits 3 (not "killed by signal
    15"). With no record written, running the same command again is a fresh run, which the
    `reference` fixture is."""
    output = tmp_path / "out.jsonl"
    proc = start_job(requests, output)
    # every rank catches SIGTERM with a handler: the startup phase (later the engines ignore
    # it instead, and rank 0's event loop takes it over)
    deadline = time.monotonic() + 60
    while True:
        ranks = rank_pids(proc)
        if len(ranks) == 3 and all(catches_signal(pid, signal.SIGTERM) for pid in ranks):
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_tree(proc)
            pytest.fail(f"the ranks never caught SIGTERM while starting up (ranks {ranks})\n"
                        f"{log_text(proc)}")
        time.sleep(0.01)
    assert count_lines(output) == 0, "the job was past its startup already"
    assert not any(catches_signal(pid, signal.SIGTERM, keys=("SigIgn",)) for pid in ranks)
    proc.send_signal(signal.SIGTERM)
    code = finish(proc)
    log = log_text(proc)
    assert code == 3, f"exit {code} after SIGTERM during startup\n{log}"
    assert count_lines(output) == 0, log


def test_sigkill_loses_no_record_and_tears_no_line(tmp_path, requests, reference):
    output = tmp_path / "out.jsonl"
    proc = start_job(requests, output)
    wait_for_lines(output, 2, proc)
    tree = descendants(proc.pid)
    before = output.read_bytes()
    os.killpg(proc.pid, signal.SIGKILL)          # mpiexec's whole group, at once
    proc.wait(timeout=30)
    # the ranks live in the proxies' sessions; they go when mpiexec's connection drops
    left = wait_gone(tree, timeout=30)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"ranks {left} outlived a SIGKILLed mpiexec by 30 s"
    after = output.read_bytes()
    assert after.startswith(before), "a record written before the kill is gone"
    records = read_records(output)                # every line whole and parseable
    assert len(records) >= 2
    tokens_by_id(records)                         # no duplicates, no errors

    code, log = run_job(requests, output)
    assert code == 0, f"the resumed run exited {code}\n{log}"
    assert_complete(output, requests, reference)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_local_launcher_stops_on_sigint_and_resumes(tmp_path, requests, reference,
                                                     monkeypatch):
    """launchers/mpiserve-local passes SIGINT on (as SIGTERM) and returns mpiexec's code."""
    monkeypatch.setenv("PATH", f"{MPIEXEC.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    output = tmp_path / "out.jsonl"
    command = [str(LAUNCHER), "-n", "3"]
    proc = start_job(requests, output, command=command)
    wait_for_lines(output, 2, proc)
    proc.send_signal(signal.SIGINT)
    code = finish(proc)
    log = log_text(proc)
    assert code == 3, f"exit {code} after SIGINT to the launcher\n{log}"
    code, log = run_job(requests, output, command=command)
    assert code == 0, f"the resumed run exited {code}\n{log}"
    assert_complete(output, requests, reference)


def rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"PMI_RANK=")).split(b"=")[1])


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_local_launcher_names_a_rank_killed_by_a_signal(tmp_path, requests, monkeypatch):
    """MPI's message names some process of the job; the launcher names the rank that died."""
    monkeypatch.setenv("PATH", f"{MPIEXEC.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    output = tmp_path / "out.jsonl"
    proc = start_job(requests, output, command=[str(LAUNCHER), "-n", "3"])
    wait_for_lines(output, 1, proc)
    victim = next(pid for pid in rank_pids(proc) if rank_of(pid) != 0)
    rank = rank_of(victim)
    os.kill(victim, signal.SIGKILL)
    code = finish(proc)
    log = log_text(proc)
    assert code == 9, f"exit {code} after SIGKILL of rank {rank}\n{log}"
    assert f"rank {rank} (pid {victim}) was killed by signal 9 (KILL)" in log, log
