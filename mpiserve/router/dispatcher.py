"""Rank 0's side of the control plane: sends calls, and turns replies, token streams, stats
and failures from the engines into asyncio results."""

from __future__ import annotations

import asyncio
import time

from ..cluster.backoff import Backoff
from ..cluster.control import ControlChannel
from ..cluster.heartbeat import drain_heartbeats
from ..cluster.messages import (
    Call,
    Fatal,
    FollowerFinal,
    Reply,
    StatsSnapshot,
    TokenBatch,
    TokenUpdate,
    TransferDone,
)


class EngineCallError(RuntimeError):
    """An engine refused a call (the message names the rank and the reason)."""


class EngineFailure(RuntimeError):
    """An engine rank died or stopped answering; the job cannot go on."""


class Dispatcher:
    def __init__(self, control: ControlChannel, engine_ranks: list[int],
                 heartbeat_timeout_s: float = 120.0, followers: dict[int, int] | None = None):
        """`engine_ranks`: the engines' leads; `followers`: each other rank of a
        tensor-parallel engine -> its lead (watched for heartbeats, never called)."""
        self.control = control
        self.engine_ranks = engine_ranks
        self.followers = dict(followers or {})
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.stats: dict[int, dict] = {}
        watched = [*engine_ranks, *self.followers]
        self.last_heard = {rank: time.monotonic() for rank in watched}
        self.heartbeats = dict.fromkeys(watched, 0)           # received, per rank
        self.follower_beats: dict[int, int] = {}              # sent, from FollowerFinal
        self.failure: EngineFailure | None = None
        self.failed = asyncio.Event()             # set with `failure`
        self._next_call = 0
        self._futures: dict[int, asyncio.Future] = {}
        self._streams: dict[int, asyncio.Queue] = {}

    # ---- calls ------------------------------------------------------------------------------
    def _send(self, rank: int, method: str, request, args: dict) -> int:
        if self.failure is not None:
            raise self.failure
        self._next_call += 1
        self.control.send(rank, Call(self._next_call, method, request, args))
        return self._next_call

    async def call(self, rank: int, method: str, request, **args):
        """Send a call and wait for its single answer (a Reply value or a TransferDone)."""
        future = asyncio.get_running_loop().create_future()
        call_id = self._send(rank, method, request, args)
        self._futures[call_id] = future
        return await future

    def stream(self, rank: int, request, **args) -> asyncio.Queue:
        """Send start_generate; its TokenUpdates (or an exception) arrive on the queue."""
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[self._send(rank, "start_generate", request, args)] = queue
        return queue

    # ---- incoming ---------------------------------------------------------------------------
    async def pump(self, stop: asyncio.Event, backoff: Backoff | None = None) -> None:
        """Deliver engine messages until `stop` is set; sleeps with backoff when idle."""
        backoff = backoff or Backoff()
        while not stop.is_set():
            try:
                messages = self.control.receive_all()
                for source, message in messages:
                    self.last_heard[source] = time.monotonic()
                    self._deliver(source, message)
                self._heard(drain_heartbeats(self.control.comm))
                self._check_heartbeats()
            except Exception as exc:         # never leave the routers waiting on a dead pump
                self._fail(EngineFailure(f"rank 0 could not handle engine messages: {exc!r}"))
                raise
            if messages:
                backoff.reset()
                await asyncio.sleep(0)
            else:
                await backoff.sleep_async()

    async def collect_final_stats(self, timeout_s: float = 5.0) -> list[int]:
        """After Shutdown: take messages until every engine sent its final stats and every
        heartbeat it counted there arrived: nothing may be left unreceived when MPI is
        finalized. Returns the engines still unfinished after `timeout_s` (none: all done)."""
        deadline = time.monotonic() + timeout_s
        backoff = Backoff()
        while self._unfinished() and time.monotonic() < deadline:
            for source, message in self.control.receive_all():
                self._deliver(source, message)
            self._heard(drain_heartbeats(self.control.comm))
            await backoff.sleep_async()
        return self._unfinished()

    def _unfinished(self) -> list[int]:
        def done(rank: int) -> bool:
            final = self.stats.get(rank, {})
            return bool(final.get("final")) and (
                self.heartbeats[rank] >= final.get("heartbeats_sent", 0))

        def follower_done(rank: int) -> bool:
            return rank in self.follower_beats and (
                self.heartbeats[rank] >= self.follower_beats[rank])
        return ([rank for rank in self.engine_ranks if not done(rank)]
                + [rank for rank in self.followers if not follower_done(rank)])

    def _deliver(self, source: int, message) -> None:
        if isinstance(message, Reply):
            future = self._futures.pop(message.call_id, None)   # None: failed already
            if future is None or future.done():
                return
            if message.error is not None:
                future.set_exception(EngineCallError(message.error))
            else:
                future.set_result(message.value)
        elif isinstance(message, TransferDone):
            future = self._futures.pop(message.call_id, None)
            if future is not None and not future.done():
                future.set_result(message)
        elif isinstance(message, TokenBatch):
            for update in message.updates:
                self._stream_update(source, update)
        elif isinstance(message, StatsSnapshot):
            self.stats[message.rank] = message.stats
        elif isinstance(message, FollowerFinal):
            self.follower_beats[message.rank] = message.heartbeats_sent
        elif isinstance(message, Fatal):
            self._fail(EngineFailure(f"engine rank {message.rank} failed:\n{message.traceback}"))

    def _stream_update(self, source: int, update: TokenUpdate) -> None:
        queue = self._streams.get(update.call_id)
        if queue is None:
            return
        queue.put_nowait(update)
        if update.done:
            del self._streams[update.call_id]

    def _heard(self, beats: dict[int, int]) -> None:
        now = time.monotonic()
        for rank, count in beats.items():
            self.last_heard[rank] = now
            self.heartbeats[rank] = self.heartbeats.get(rank, 0) + count

    def silent_s(self) -> dict[int, float]:
        """Seconds since each engine was last heard from (heartbeat or message)."""
        now = time.monotonic()
        return {rank: now - t for rank, t in self.last_heard.items()}

    def _check_heartbeats(self) -> None:
        silent = [r for r, s in self.silent_s().items() if s > self.heartbeat_timeout_s]
        if silent and self.failure is None:
            self._fail(EngineFailure(f"lost engine rank(s) {', '.join(self._where(silent))}: "
                                     f"nothing heard for {self.heartbeat_timeout_s:g} s "
                                     "(stopped, killed, or its host unreachable)"))

    def _where(self, ranks: list[int]) -> list[str]:
        def where(rank: int) -> str:
            lead = self.followers.get(rank)
            if lead is None:
                return f"{rank} on host {self.stats.get(rank, {}).get('host', '?')}"
            return f"{rank} (tensor-parallel rank of the engine led by rank {lead})"
        return [where(rank) for rank in ranks]

    def _fail(self, failure: EngineFailure) -> None:
        self.failure = failure
        self.failed.set()
        for future in self._futures.values():
            if not future.done():
                future.set_exception(failure)
        for queue in self._streams.values():
            queue.put_nowait(failure)
        self._futures.clear()
        self._streams.clear()
