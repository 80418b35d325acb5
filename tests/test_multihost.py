"""mpiserve across hosts: three network-namespace hosts (tests/netns_hosts.py), each with its own
address and a hostname that resolves to loopback as on a stock node. MPICH's hydra starts the
ranks on them as over ssh. Rank 0 must advertise an address the other hosts reach (not its
hostname's loopback), the output must equal a one-host run's, an unreachable address must end
the job in seconds with a message naming it, and a lost host ends the job with the records
written intact, so that a re-run on the hosts left resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import batch_jobs as jobs
import pytest
from netns_hosts import NetnsHosts

pytestmark = pytest.mark.mpi

REQUESTS = 16               # one at a time (--max-inflight 1): a host loss lands mid-run
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def hosts():
    reason = NetnsHosts.unavailable()
    if reason:
        pytest.skip(reason)
    with NetnsHosts(3) as made:
        yield made


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    return jobs.write_requests(tmp_path_factory.mktemp("multihost") / "in.jsonl", REQUESTS,
                          MAX_TOKENS)


def across_hosts(hosts: NetnsHosts, source, output, *options):
    """The job with rank 0 (router) on host a, the prefill engine on b, the decode engine on
    c: every KV transfer crosses hosts."""
    command = hosts.mpiexec(str(jobs.MPIEXEC), [1, 1, 1], [str(jobs.MPISERVE), "run"])
    proc = jobs.start_job(source, output, "--dashboard", "plain", *options, command=command)
    return jobs.finish(proc), jobs.log_text(proc)


@pytest.fixture(scope="module")
def reference(requests, tmp_path_factory):
    """Token ids of the same job on one host."""
    return jobs.reference_tokens(requests, tmp_path_factory.mktemp("reference"))


def test_engines_on_other_hosts_give_the_one_host_tokens(hosts, requests, reference, tmp_path):
    code, log = across_hosts(hosts, requests, tmp_path / "three-hosts.jsonl")
    assert code == 0, log
    assert jobs.tokens_by_id(jobs.read_records(tmp_path / "three-hosts.jsonl")) == reference
    assert len(reference) == REQUESTS


def test_unreachable_rendezvous_address_fails_naming_it(hosts, requests, tmp_path):
    # loopback on purpose: each host's 127.0.0.1 is its own, so no engine can connect
    output = tmp_path / "out.jsonl"
    code, log = across_hosts(hosts, requests, output, "--bind-interface", "lo")
    assert code == 2, log
    assert "rendezvous address 127.0.0.1" in log and "unreachable" in log, log
    assert f"rank 1: {hosts.names[1]} could not connect to 127.0.0.1" in log, log
    assert f"rank 2: {hosts.names[2]} could not connect" in log, log
    assert log.count("mpiserve: error:") == 1, log
    assert not output.exists() or output.read_text() == ""


def ranks_on(hosts: NetnsHosts, host: int) -> list[int]:
    """The mpiserve rank processes running on host `host`."""
    found = subprocess.run(["ip", "netns", "pids", hosts.names[host]], capture_output=True,
                           text=True, timeout=10).stdout.split()
    return jobs.mpiserve_ranks(map(int, found))


def test_a_lost_host_ends_the_job_and_the_survivors_resume(hosts, requests, reference,
                                                           tmp_path):
    """Every rank on host c killed mid-run (the host is gone): the job ends naming the host,
    the records written stay whole, and the same command on hosts a and b
    alone completes the rest with the uninterrupted run's tokens."""
    source, output = requests, tmp_path / "out.jsonl"
    command = hosts.mpiexec(str(jobs.MPIEXEC), [1, 1, 1], [str(jobs.MPISERVE), "run"])
    proc = jobs.start_job(source, output, "--dashboard", "plain", command=command)
    jobs.wait_for_lines(output, 3, proc)
    lost = ranks_on(hosts, 2)
    assert lost, "no rank found on host c"
    for pid in lost:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    code = jobs.finish(proc)
    print(f"job ended {time.monotonic() - killed:.1f} s after host c's ranks were killed")
    log = jobs.log_text(proc)
    assert code != 0, log
    # MPICH's hydra names the host and the process id (the rank: once rank 0's heartbeat
    # finds the loss first)
    assert f"RUNNING AT {hosts.addresses[2]}" in log, log
    done = jobs.tokens_by_id(jobs.read_records(output))      # whole lines, no duplicates
    assert 3 <= len(done) < len(reference), log

    survivors = hosts.mpiexec(str(jobs.MPIEXEC), [1, 2, 0], [str(jobs.MPISERVE), "run"])
    rerun = jobs.start_job(source, output, "--dashboard", "plain", command=survivors)
    assert jobs.finish(rerun) == 0, jobs.log_text(rerun)
    assert jobs.tokens_by_id(jobs.read_records(output)) == reference
