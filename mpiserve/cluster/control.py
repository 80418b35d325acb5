"""The control plane: pickled message objects over mpi4py, non-blocking and ordered per pair."""

from __future__ import annotations

import time

from .doorbell import SILENT, installed
from .layout import ROUTER_RANK

CONTROL_TAG = 7301


class ControlChannel:
    """Sends with `isend` and keeps each request until it completes; receives by draining
    matched probes, so one call never blocks.

    With a doorbell installed (cluster.doorbell), rank 0's channel rings the engine it sends
    to, and an engine's `wait` wakes on its own: an idle engine starts a call at once rather
    than at the end of its sleep. Engines do not ring rank 0, which polls on its timer: on two
    cores shared by three ranks, waking rank 0 at every token batch slowed the decode engine
    (results/README.md, "Doorbells")."""

    def __init__(self, comm, tag: int = CONTROL_TAG):
        self.comm = comm
        self.tag = tag                    # messages of another tag are another channel's
        self.rank = comm.Get_rank()
        doorbell = installed() if tag == CONTROL_TAG else None
        self._rings = doorbell if self.rank == ROUTER_RANK else None
        self._waits_on = (doorbell if self.rank != ROUTER_RANK else None) or SILENT
        self._in_flight = []

    def send(self, dest: int, message) -> None:
        self._in_flight.append(self.comm.isend(message, dest=dest, tag=self.tag))
        if self._rings is not None:
            self._rings.ring(dest)
        if len(self._in_flight) > 64:
            self._reap()

    def broadcast(self, dests, message) -> None:
        for dest in dests:
            self.send(dest, message)

    def wait(self, timeout: float) -> bool:
        """Sleep until a message is on its way (the doorbell rang: True) or `timeout` passed
        (False). A rung message may take a moment more to be receivable."""
        return self._waits_on.wait(timeout)

    def receive_all(self) -> list[tuple[int, object]]:
        """Every message that has arrived, as (source rank, message), in arrival order."""
        from mpi4py import MPI
        got = []
        status = MPI.Status()
        while True:
            handle = self.comm.improbe(source=MPI.ANY_SOURCE, tag=self.tag, status=status)
            if handle is None:
                return got
            got.append((status.Get_source(), handle.recv()))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until every sent message has left; True if they all did."""
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.001)
        return not self._in_flight

    def _reap(self) -> None:
        self._in_flight = [req for req in self._in_flight if not req.Test()]
