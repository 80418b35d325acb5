"""Engine liveness, independent of how long an engine step takes: each engine rank sends a
small heartbeat to rank 0 from a thread of its own, on a tag of its own; rank 0 drains them
with the control messages and counts silence from the last message of either kind.

At the end an engine stops its heartbeats first and reports how many it sent with its final
stats; rank 0 receives exactly that many before it finalizes MPI (a heartbeat left unreceived
makes MPI_Finalize fail on rank 0, and the launcher then kills the whole job)."""

from __future__ import annotations

import threading
import time
from collections import Counter

HEARTBEAT_TAG = 7302


def heartbeat_interval(timeout_s: float) -> float:
    """A fifth of the timeout, at most one second: several beats fit in every timeout."""
    return max(0.05, min(1.0, timeout_s / 5))


class HeartbeatSender:
    """A daemon thread that sends `time.time()` to rank 0 every `interval_s` until stopped.
    MPI calls from it need the thread support mpi4py asks for by default (MULTIPLE)."""

    def __init__(self, comm, interval_s: float, dest: int = 0):
        self.comm, self.interval_s, self.dest = comm, interval_s, dest
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mpiserve-heartbeat",
                                        daemon=True)

    def start(self) -> HeartbeatSender:
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop beating; returns how many heartbeats were sent in all."""
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s + 1.0)
        return self.sent

    def _beat(self) -> None:
        pending = []
        while not self._stop.is_set():
            pending = [req for req in pending if not req.Test()]
            if len(pending) < 8:         # rank 0 not reading: do not pile up sends
                pending.append(self.comm.isend(time.time(), dest=self.dest, tag=HEARTBEAT_TAG))
                self.sent += 1
            self._stop.wait(self.interval_s)


def drain_heartbeats(comm) -> Counter[int]:
    """How many heartbeats arrived from each rank since the last call (they are consumed)."""
    from mpi4py import MPI
    heard: Counter[int] = Counter()
    status = MPI.Status()
    while True:
        handle = comm.improbe(source=MPI.ANY_SOURCE, tag=HEARTBEAT_TAG, status=status)
        if handle is None:
            return heard
        handle.recv()
        heard[status.Get_source()] += 1
