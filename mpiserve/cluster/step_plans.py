"""A tensor-parallel engine's step plans: its lead rank decides everything (scheduling,
paging, prefix cache, preemption, KV transfers) and sends the other ranks of its group, in
order, what to run on their shards: each step's forward batch with the KV it streams out,
the receives of KV coming in, and where landed KV is written. Over an MPI communicator of
the group in which the lead is rank 0; `None` ends a follower's loop. Followers answer each
receive with a `Landed` (its error, if any), which the lead waits for before it writes."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .messages import KVAnnounce

PLAN_TAG, LANDED_TAG = 7302, 7303
LEAD = 0


@dataclass
class StepPlan:
    batch: object                       # the step's ForwardBatch
    streams: tuple = ()                 # kv_transfer.KVStream: KV sent as layers finish


@dataclass
class ReceivePlan:
    key: int                            # names this announcement in Landed and WritePlan
    source: int                         # the sending engine's lead rank
    announce: KVAnnounce


@dataclass
class WritePlan:
    key: int
    writes: tuple                       # per piece: (offset into it, KV slots) or None: drop


@dataclass
class Landed:
    key: int
    error: str | None


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

    # ---- lead ------------------------------------------------------------------------------
    def publish(self, plan) -> None:
        """Send a plan (tensors on the CPU; None: stop following) to every follower."""
        self._reap()
        for rank in self.followers:
            self._in_flight.append(self.comm.isend(plan, dest=rank, tag=PLAN_TAG))

    def publish_step(self, batch, streams=()) -> None:
        self.publish(StepPlan(batch.to("cpu"), tuple(s.to("cpu") for s in streams)))

    def landed(self) -> list[Landed]:
        """Every follower's answer that has arrived."""
        got = []
        while self.comm.iprobe(tag=LANDED_TAG):
            got.append(self.comm.recv(tag=LANDED_TAG))
        return got

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait (bounded) until every plan sent has left; True if they all did."""
        deadline = time.monotonic() + timeout_s
        while self._in_flight and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.001)
        return not self._in_flight

    def _reap(self) -> None:
        self._in_flight = [req for req in self._in_flight if not req.Test()]

    # ---- follower ----------------------------------------------------------------------------
    def poll(self) -> tuple[bool, object]:
        """(True, the lead's next plan) if one has arrived, else (False, None)."""
        if not self.comm.iprobe(source=LEAD, tag=PLAN_TAG):
            return False, None
        return True, self.comm.recv(source=LEAD, tag=PLAN_TAG)

    def answer(self, key: int, error: str | None) -> None:
        self._reap()
        self._in_flight.append(self.comm.isend(Landed(key, error), dest=LEAD, tag=LANDED_TAG))
