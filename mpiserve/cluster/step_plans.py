"""A tensor-parallel engine's step plans: its lead rank schedules each step and sends the
forward batch to the other ranks of its group, which run the same forward pass on their
shards (so paging, prefix cache and preemption are decided once). Over an MPI communicator
of the group, in which the lead is rank 0; `None` ends a follower's loop."""

from __future__ import annotations

import time

from .backoff import Backoff

PLAN_TAG = 7302
LEAD = 0


class StepPlans:
    def __init__(self, comm):
        self.comm = comm
        self._in_flight = []

    @property
    def is_lead(self) -> bool:
        return self.comm.Get_rank() == LEAD

    @property
    def followers(self) -> range:
        return range(1, self.comm.Get_size())

    def publish(self, batch) -> None:
        """Lead: send the step's forward batch (None: stop following) to every follower."""
        plan = None if batch is None else batch.to("cpu")
        self._in_flight = [req for req in self._in_flight if not req.Test()]
        for rank in self.followers:
            self._in_flight.append(self.comm.isend(plan, dest=rank, tag=PLAN_TAG))

    def next(self):
        """Follower: the lead's next forward batch (on the CPU), or None when it says stop.
        Waits without
        spinning; the wait ends with the lead's next step, its stop, or (when the lead dies)
        the MPI launcher ending the job."""
        backoff = Backoff(first=0.0001)       # the next step usually follows within ms
        while not self.comm.iprobe(source=LEAD, tag=PLAN_TAG):
            backoff.sleep()
        return self.comm.recv(source=LEAD, tag=PLAN_TAG)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Lead: wait (bounded) until every plan sent has left; True if they all did."""
        deadline = time.monotonic() + timeout_s
        while self._in_flight and time.monotonic() < deadline:
            self._in_flight = [req for req in self._in_flight if not req.Test()]
            time.sleep(0.001)
        return not self._in_flight
