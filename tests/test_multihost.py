"""mpiserve across hosts: three network-namespace hosts (tests/netns_hosts.py), each with its own
address and a hostname that resolves to loopback as on a stock node. MPICH's hydra starts the
ranks on them as over ssh. Rank 0 must advertise an address the other hosts reach (not its
hostname's loopback), the output must equal a one-host run's, and an unreachable address must
end the job in seconds with a message naming it."""

from __future__ import annotations

import batch_jobs as jobs
import pytest
from netns_hosts import NetnsHosts

pytestmark = pytest.mark.mpi

REQUESTS = 6
MAX_TOKENS = 12


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


def test_engines_on_other_hosts_give_the_one_host_tokens(hosts, requests, tmp_path):
    code, log = jobs.run_job(requests, tmp_path / "one-host.jsonl")
    assert code == 0, log
    expected = jobs.tokens_by_id(jobs.read_records(tmp_path / "one-host.jsonl"))
    code, log = across_hosts(hosts, requests, tmp_path / "three-hosts.jsonl")
    assert code == 0, log
    assert jobs.tokens_by_id(jobs.read_records(tmp_path / "three-hosts.jsonl")) == expected
    assert len(expected) == REQUESTS


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
