"""Which address of rank 0 the other ranks meet at, and which interface each rank's gloo uses.

Pure logic over what every rank reports about itself (hostname and IPv4 interfaces): no MPI,
no torch, no sockets, so it is tested directly. `bringup` gathers the reports over MPI, calls
`choose_rendezvous`, and then checks that the choice really connects.

Rules, in order:
  1. An interface named by the user (--bind-interface / MPISERVE_BIND_INTERFACE): rank 0's
     address on it; every rank uses the interface of that name, or, lacking it, its interface
     on the same subnet. Missing on rank 0, or on a rank with no interface on that subnet: an
     error naming the rank, its host and the interfaces it has.
  2. All ranks on one host (same hostname and same addresses): loopback.
  3. Otherwise rank 0's non-loopback address on the subnet shared by the most other ranks
     (first listed wins a tie); each rank uses its interface on that subnet, or lets gloo pick
     when it has none (a routed network), in which case the connection check decides.
Loopback is never chosen across hosts: a hostname that resolves to 127.0.1.1 (stock
Debian/Ubuntu /etc/hosts) is exactly what must not be advertised to another node.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..errors import MpiserveError

LOOPBACK_ADDRESS = "127.0.0.1"
LOOPBACK_INTERFACE = "lo"


@dataclass(frozen=True)
class Interface:
    name: str
    address: str        # IPv4, dotted
    prefix: int         # netmask length

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Interface(f"{self.address}/{self.prefix}").network

    @property
    def loopback(self) -> bool:
        return ipaddress.IPv4Address(self.address).is_loopback


@dataclass(frozen=True)
class HostReport:
    """What one rank says about where it runs."""
    hostname: str
    interfaces: tuple[Interface, ...]

    def on(self, network: ipaddress.IPv4Network) -> Interface | None:
        return next((i for i in self.interfaces
                     if ipaddress.IPv4Address(i.address) in network), None)

    def named(self, name: str) -> Interface | None:
        return next((i for i in self.interfaces if i.name == name), None)

    def describe(self) -> str:
        listed = ", ".join(f"{i.name} {i.address}/{i.prefix}" for i in self.interfaces)
        return f"host {self.hostname} (interfaces: {listed or 'none with IPv4'})"


@dataclass(frozen=True)
class Rendezvous:
    address: str                          # rank 0's address every rank connects to
    own: tuple[Interface | None, ...]     # per rank: its interface on the chosen network,
                                          # where the others reach it; None = gloo decides
    reason: str                           # why this address, for messages

    @property
    def interfaces(self) -> tuple[str | None, ...]:
        """Per rank: its GLOO_SOCKET_IFNAME (None: gloo decides)."""
        return tuple(None if i is None else i.name for i in self.own)


class BindError(MpiserveError):
    """No usable rendezvous address. Raised on every rank; `quiet` on all but rank 0, so the
    job prints the message once."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def choose_rendezvous(reports: list[HostReport], bind_interface: str | None = None) -> Rendezvous:
    """The rendezvous for a job whose rank r reported reports[r]."""
    if not reports:
        raise ValueError("choose_rendezvous needs at least rank 0's report")
    if bind_interface:
        return _by_name(reports, bind_interface)
    if _single_host(reports):
        loopback = Interface(LOOPBACK_INTERFACE, LOOPBACK_ADDRESS, 8)
        return Rendezvous(LOOPBACK_ADDRESS, (loopback,) * len(reports), "all ranks on one host")
    return _by_shared_subnet(reports)


def _single_host(reports: list[HostReport]) -> bool:
    first = reports[0]
    return all(r.hostname == first.hostname and set(r.interfaces) == set(first.interfaces)
               for r in reports)


def _by_name(reports: list[HostReport], name: str) -> Rendezvous:
    chosen = reports[0].named(name)
    if chosen is None:
        raise BindError(f"bind interface {name!r} has no IPv4 address on rank 0, "
                        f"{reports[0].describe()}")
    owns = []
    for rank, report in enumerate(reports):
        own = report.named(name) or report.on(chosen.network)
        if own is None:
            raise BindError(f"rank {rank} on {report.describe()} has no interface {name!r} and "
                            f"none on rank 0's subnet {chosen.network}")
        owns.append(own)
    return Rendezvous(chosen.address, tuple(owns), f"interface {name}, as asked")


def _by_shared_subnet(reports: list[HostReport]) -> Rendezvous:
    candidates = [i for i in reports[0].interfaces if not i.loopback]
    if not candidates:
        raise BindError(f"ranks run on several hosts but rank 0 has no non-loopback IPv4 "
                        f"address: {reports[0].describe()}")
    best = max(candidates, key=lambda c: sum(r.on(c.network) is not None for r in reports))
    owns = tuple(r.on(best.network) for r in reports)
    shared = sum(own is not None for own in owns[1:])
    return Rendezvous(best.address, owns,
                      f"interface {best.name}, subnet {best.network} shared by "
                      f"{shared} of {len(reports) - 1} other ranks")

