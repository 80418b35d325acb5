"""A tensor-parallel engine's step plans: its lead rank decides everything (scheduling,
paging, prefix cache, preemption, KV transfers) and sends the other ranks of its group, in
order, what to run on their shards: each step's forward batch with the KV it streams out,
the receives of KV coming in, and where landed KV is written. Over an MPI communicator of
the group in which the lead is rank 0; `None` ends a follower's loop. Followers answer each
receive with a `Landed` (its error, if any), which the lead waits for before it writes."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .control import ControlChannel
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
        self._plans = ControlChannel(comm, PLAN_TAG)          # lead -> followers
        self._answers = ControlChannel(comm, LANDED_TAG)      # followers -> lead
        self._arrived: deque = deque()                        # follower: plans not yet taken

    @property
    def is_lead(self) -> bool:
        return self.comm.Get_rank() == LEAD

    @property
    def followers(self) -> range:
        return range(1, self.comm.Get_size())

    # ---- lead ------------------------------------------------------------------------------
    def publish(self, plan) -> None:
        """Send a plan (tensors on the CPU; None: stop following) to every follower."""
        self._plans.broadcast(self.followers, plan)

    def publish_step(self, batch, streams=()) -> None:
        self.publish(StepPlan(batch.to("cpu"), tuple(s.to("cpu") for s in streams)))

    def landed(self) -> list[Landed]:
        """Every follower's answer that has arrived."""
        return [answer for _, answer in self._answers.receive_all()]

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait (bounded) until every plan or answer sent has left; True if they all did."""
        return self._plans.flush(timeout_s) and self._answers.flush(timeout_s)

    # ---- follower ----------------------------------------------------------------------------
    def poll(self) -> tuple[bool, object]:
        """(True, the lead's next plan) if one has arrived, else (False, None)."""
        if not self._arrived:
            self._arrived.extend(plan for _, plan in self._plans.receive_all())
        return (True, self._arrived.popleft()) if self._arrived else (False, None)

    def answer(self, key: int, error: str | None) -> None:
        self._answers.send(LEAD, Landed(key, error))
