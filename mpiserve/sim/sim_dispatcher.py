"""The simulator's stand-in for rank 0's Dispatcher: the same `call`, `stream`, `stats`,
`failed` and `failure`, with simulated engines in place of MPI ranks. Engine handles and the
cluster use it exactly as they use the real one."""

from __future__ import annotations

import asyncio
from collections import deque

from ..cluster.messages import Call, TokenUpdate
from ..router.dispatcher import EngineFailure


class TokenStream:
    """A start_generate's updates for its one reader: the `put_nowait` and `await get()` of
    the asyncio.Queue the real dispatcher hands out, without its bookkeeping (a simulation
    sends one per token, so this is on its hottest path). `get` returns a future rather than
    a coroutine: the item, or the reader's wait for it, which the next item ends."""

    __slots__ = ("_items", "_waiter", "_loop")

    def __init__(self):
        self._loop = asyncio.get_running_loop()
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(item)
        else:
            self._items.append(item)

    def get(self) -> asyncio.Future:
        future = self._loop.create_future()
        if self._items:
            future.set_result(self._items.popleft())
        else:
            self._waiter = future
        return future


class DelayedWire:
    """Messages one way between rank 0 and the engines, each arriving `latency_s` after it was
    sent, in the order sent (one timer for the wire, not one per message)."""

    def __init__(self, latency_s: float):
        self.latency_s = latency_s
        self._queue: deque = deque()          # (due time, callback, args), in sending order
        self._timer: asyncio.TimerHandle | None = None

    def send(self, callback, *args) -> None:
        if self.latency_s <= 0:
            callback(*args)
            return
        loop = asyncio.get_running_loop()
        self._queue.append((loop.time() + self.latency_s, callback, args))
        if self._timer is None:
            self._timer = loop.call_at(self._queue[0][0], self._arrive)

    def _arrive(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue and self._queue[0][0] <= loop.time():
            _, callback, args = self._queue.popleft()
            callback(*args)
        self._timer = loop.call_at(self._queue[0][0], self._arrive) if self._queue else None


class SimDispatcher:
    """`latency_s`: the one-way delay of every message between rank 0 and an engine (calls,
    their answers, token updates); 0 delivers at once."""

    def __init__(self, latency_s: float = 0.0):
        self._to_engines, self._to_router = DelayedWire(latency_s), DelayedWire(latency_s)
        self.engines: dict = {}               # lead rank -> SimEngine
        self.stats: dict[int, dict] = {}
        self.failure: EngineFailure | None = None
        self.failed = asyncio.Event()
        self._next_call = 0
        self._streams: dict[int, TokenStream] = {}

    def _post(self, rank: int, method: str, request, args: dict, future) -> int:
        if self.failure is not None:
            raise self.failure
        self._next_call += 1
        self._to_engines.send(self.engines[rank].receive,
                              Call(self._next_call, method, request, args), future)
        return self._next_call

    async def call(self, rank: int, method: str, request, **args):
        """A call's single answer: the engine sets its future's result or exception, which
        reaches the caller over the wire back."""
        loop = asyncio.get_running_loop()
        answer, future = loop.create_future(), loop.create_future()
        future.add_done_callback(lambda done: self._to_router.send(_pass_on, done, answer))
        self._post(rank, method, request, args, future)
        return await answer

    def stream(self, rank: int, request, **args) -> TokenStream:
        queue = TokenStream()
        self._streams[self._post(rank, "start_generate", request, args, None)] = queue
        return queue

    # ---- from the engines ------------------------------------------------------------------
    def deliver(self, updates: list[TokenUpdate]) -> None:
        self._to_router.send(self._deliver_now, updates)

    def _deliver_now(self, updates: list[TokenUpdate]) -> None:
        for update in updates:
            queue = self._streams.get(update.call_id)
            if queue is None:
                continue
            queue.put_nowait(update)
            if update.done:
                del self._streams[update.call_id]

    def stream_failed(self, call_id: int, error: Exception) -> None:
        queue = self._streams.pop(call_id, None)
        if queue is not None:
            queue.put_nowait(error)

    def report(self, rank: int, stats: dict) -> None:
        self.stats[rank] = stats

    def fail(self, failure: EngineFailure) -> None:
        """An engine crashed (a bug in the simulation): end every wait on it."""
        if self.failure is not None:
            return
        self.failure = failure
        self.failed.set()
        for queue in self._streams.values():
            queue.put_nowait(failure)
        self._streams.clear()
        for engine in self.engines.values():
            engine.fail_pending(failure)


def _pass_on(done: asyncio.Future, answer: asyncio.Future) -> None:
    """Give the engine's settled answer to the caller (unless the caller stopped waiting)."""
    if answer.done():
        return
    if done.cancelled():
        answer.cancel()
    elif done.exception() is not None:
        answer.set_exception(done.exception())
    else:
        answer.set_result(done.result())
