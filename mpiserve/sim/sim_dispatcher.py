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

    __slots__ = ("_items", "_waiter")

    def __init__(self):
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(item)
        else:
            self._items.append(item)

    def get(self) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        if self._items:
            future.set_result(self._items.popleft())
        else:
            self._waiter = future
        return future


class SimDispatcher:
    def __init__(self):
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
        self.engines[rank].receive(Call(self._next_call, method, request, args), future)
        return self._next_call

    async def call(self, rank: int, method: str, request, **args):
        """A call's single answer: the engine sets the future's result or exception."""
        future = asyncio.get_running_loop().create_future()
        self._post(rank, method, request, args, future)
        return await future

    def stream(self, rank: int, request, **args) -> TokenStream:
        queue = TokenStream()
        self._streams[self._post(rank, "start_generate", request, args, None)] = queue
        return queue

    # ---- from the engines ------------------------------------------------------------------
    def deliver(self, updates: list[TokenUpdate]) -> None:
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
