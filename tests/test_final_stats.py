"""The end of a job on rank 0: it waits for every engine's final stats and for every heartbeat
the engine counted in them (an unreceived message fails MPI_Finalize, and the launcher then
kills the job), and no longer than its bound, naming the engines that never finished."""

import asyncio
import time

from mpiserve.cluster.messages import StatsSnapshot
from mpiserve.router.dispatcher import Dispatcher


class FakeHeartbeatComm:
    """improbe hands out the queued heartbeats' sources, as MPI's matched probe would."""

    def __init__(self):
        self.beats: list[int] = []

    def improbe(self, source, tag, status):
        if not self.beats:
            return None
        status.Set_source(self.beats.pop(0))
        return FakeMessage()


class FakeMessage:
    def recv(self):
        return time.time()


class FakeControl:
    def __init__(self, messages):
        self.comm = FakeHeartbeatComm()
        self.messages = list(messages)

    def receive_all(self):
        out, self.messages = self.messages, []
        return out


def final(rank, heartbeats_sent=0):
    return rank, StatsSnapshot(rank, {"final": True, "heartbeats_sent": heartbeats_sent})


def test_final_stats_wait_for_every_heartbeat_they_count():
    control = FakeControl([final(1, heartbeats_sent=2)])
    control.comm.beats = [1]                         # one of the two is still on its way
    dispatcher = Dispatcher(control, [1])
    assert asyncio.run(dispatcher.collect_final_stats(0.2)) == [1]
    control.comm.beats = [1]
    assert asyncio.run(dispatcher.collect_final_stats(0.2)) == []
    assert dispatcher.heartbeats[1] == 2


def test_an_engine_that_never_reports_is_named_once_the_bound_passes():
    dispatcher = Dispatcher(FakeControl([final(1)]), [1, 2])
    began = time.monotonic()
    assert asyncio.run(dispatcher.collect_final_stats(0.3)) == [2]
    assert 0.3 <= time.monotonic() - began < 3


def test_all_engines_done_returns_at_once():
    dispatcher = Dispatcher(FakeControl([final(1), final(2)]), [1, 2])
    began = time.monotonic()
    assert asyncio.run(dispatcher.collect_final_stats(30)) == []
    assert time.monotonic() - began < 3
