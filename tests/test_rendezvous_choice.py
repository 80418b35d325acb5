"""The rendezvous address choice (pure logic, no MPI): loopback only on one host, rank 0's
address on the subnet the other ranks share, the interface the user names, and errors that name
the rank and host at fault. Plus this host's own interface report."""

from __future__ import annotations

import pytest

from mpiserve.cluster.host_interfaces import local_report
from mpiserve.cluster.rendezvous_choice import BindError, HostReport, Interface, choose_rendezvous

LO = Interface("lo", "127.0.0.1", 8)


def host(name: str, *interfaces: Interface) -> HostReport:
    return HostReport(name, (LO, *interfaces))


def test_one_host_uses_loopback():
    node = host("a", Interface("eth0", "10.0.0.1", 24))
    choice = choose_rendezvous([node, node, node])
    assert choice.address == "127.0.0.1"
    assert choice.interfaces == ("lo", "lo", "lo")


def test_same_hostname_but_other_addresses_is_not_one_host():
    # e.g. network namespaces, or nodes all named "localhost"
    a = host("node", Interface("eth0", "10.0.0.1", 24))
    b = host("node", Interface("eth0", "10.0.0.2", 24))
    assert choose_rendezvous([a, b]).address == "10.0.0.1"


def test_hosts_use_rank0_address_on_the_shared_subnet():
    a = host("a", Interface("docker0", "172.17.0.1", 16), Interface("ib0", "10.9.0.1", 16),
             Interface("eth0", "192.168.1.10", 24))
    b = host("b", Interface("eth1", "192.168.1.11", 24), Interface("ib0", "10.9.0.2", 16))
    c = host("c", Interface("ib0", "10.9.0.3", 16))
    choice = choose_rendezvous([a, b, b, c])
    assert choice.address == "10.9.0.1"
    assert choice.interfaces == ("ib0", "ib0", "ib0", "ib0")
    assert "3 of 3" in choice.reason


def test_rank_without_a_shared_subnet_lets_gloo_choose():
    a = host("a", Interface("eth0", "10.0.0.1", 24))
    b = host("b", Interface("eth0", "10.0.0.2", 24))
    routed = host("c", Interface("eth0", "10.5.0.7", 24))
    choice = choose_rendezvous([a, b, routed])
    assert choice.address == "10.0.0.1"
    assert choice.interfaces == ("eth0", "eth0", None)


def test_never_loopback_across_hosts():
    a = HostReport("a", (LO, Interface("lo2", "127.0.1.1", 8)))
    b = host("b", Interface("eth0", "10.0.0.2", 24))
    with pytest.raises(BindError, match="rank 0 has no non-loopback IPv4.*host a"):
        choose_rendezvous([a, b])


def test_named_interface_wins():
    a = host("a", Interface("eth0", "10.0.0.1", 24), Interface("ib0", "10.9.0.1", 16))
    b = host("b", Interface("eth0", "10.0.0.2", 24), Interface("ib0", "10.9.0.2", 16))
    choice = choose_rendezvous([a, b], bind_interface="ib0")
    assert (choice.address, choice.interfaces) == ("10.9.0.1", ("ib0", "ib0"))
    # on one host too: the user asked for it
    assert choose_rendezvous([a, a], bind_interface="eth0").address == "10.0.0.1"


def test_named_interface_matched_by_subnet_where_names_differ():
    a = host("a", Interface("ens1", "10.0.0.1", 24))
    b = host("b", Interface("enp3s0", "10.0.0.2", 24))
    assert choose_rendezvous([a, b], "ens1").interfaces == ("ens1", "enp3s0")


def test_named_interface_missing_is_an_error_naming_it():
    a = host("a", Interface("eth0", "10.0.0.1", 24))
    b = host("b", Interface("eth0", "10.1.0.2", 24))
    with pytest.raises(BindError, match=r"'ib0' has no IPv4 address on rank 0, host a "
                                        r"\(interfaces: lo 127.0.0.1/8, eth0 10.0.0.1/24\)"):
        choose_rendezvous([a, b], "ib0")
    c = host("c", Interface("wlan0", "10.0.0.3", 24))
    with pytest.raises(BindError, match="rank 1 on host b .* no interface 'eth1' and none "
                                        "on rank 0's subnet 10.0.0.0/24"):
        choose_rendezvous([host("a", Interface("eth1", "10.0.0.1", 24)), b, c], "eth1")


def test_local_report_lists_loopback():
    report = local_report()
    assert report.hostname
    assert any(i.name == "lo" and i.address.startswith("127.") for i in report.interfaces)


def test_each_rank_is_reached_at_its_own_address_on_the_chosen_network():
    a = host("a", Interface("eth0", "10.0.0.1", 24))
    b = host("b", Interface("eth1", "10.0.0.7", 24), Interface("ib0", "10.9.0.7", 16))
    routed = host("c", Interface("eth0", "192.168.5.5", 24))
    choice = choose_rendezvous([a, b, routed])
    assert [None if i is None else i.address for i in choice.own] == [
        "10.0.0.1", "10.0.0.7", None]
    assert [i.address for i in choose_rendezvous([a, a]).own] == ["127.0.0.1"] * 2
    assert [i.address for i in choose_rendezvous([a, b], "eth0").own] == ["10.0.0.1",
                                                                         "10.0.0.7"]
