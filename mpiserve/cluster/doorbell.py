"""Wake-ups for a rank that waits on control messages, so it need not poll MPI faster.

A rank with nothing to do sleeps between looks at MPI (cluster.backoff, up to 20 ms), since
MPICH's blocking receive spins a core. A sleep delays whatever arrives meanwhile, and a request
crosses ranks several times. So a control message can be followed by a one-byte UDP datagram
to its receiver's doorbell, and a sleeping rank waits on its doorbell, with its backoff delay
as the timeout: it wakes when a message arrives. The datagram carries nothing; a lost one (a full
socket buffer, an address another host cannot reach) costs that wake-up only, since the
timeout still ends the wait.

Each rank opens one doorbell when the data plane starts (`install`); rank 0's control channel
rings the engines' (cluster.control says why only that way).
"""

from __future__ import annotations

import select
import socket
import time

_installed: Doorbell | None = None


class Doorbell:
    """This rank's UDP socket and the address of every rank's doorbell (None: unreachable)."""

    def __init__(self, sock: socket.socket | None, peers: list[tuple[str, int] | None]):
        self.sock, self.peers = sock, peers
        if sock is not None:
            sock.setblocking(False)

    @classmethod
    def open(cls, comm, address: str | None) -> Doorbell:
        """Collective: bind a doorbell on `address` (None: this rank gets none) and learn
        every rank's."""
        sock = None
        if address is not None:
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((address, 0))
            except OSError:
                sock = None
        return cls(sock, comm.allgather(None if sock is None else sock.getsockname()))

    def ring(self, rank: int) -> None:
        peer = None if self.sock is None else self.peers[rank]
        if peer is None:
            return
        try:
            self.sock.sendto(b"\0", peer)
        except OSError:                   # a full buffer or no route: the receiver's timer
            pass                          # wakes it instead

    def wait(self, timeout: float) -> bool:
        """Return when rung (or rung since the last wait): True; else after `timeout`
        seconds: False."""
        if self.sock is None:
            time.sleep(timeout)
            return False
        select.select([self.sock], [], [], timeout)
        return self._drain()

    def _drain(self) -> bool:
        """Take every ring waiting; whether there was one."""
        rung = False
        try:
            while True:
                self.sock.recv(64)
                rung = True
        except OSError:                   # BlockingIOError: nothing left
            return rung

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


SILENT = Doorbell(None, [])     # never rings: waiting on it is a sleep


def install(doorbell: Doorbell) -> None:
    """Make `doorbell` this process's (closing any earlier one)."""
    global _installed
    if _installed is not None:
        _installed.close()
    _installed = doorbell


def installed() -> Doorbell | None:
    return _installed
