"""An asyncio event loop whose clock is virtual: when no callback is ready, time jumps to the
next scheduled one instead of waiting for it. `asyncio.sleep`, `wait_for` and `loop.time()`
behave as usual, so router code runs unchanged; a simulated hour takes as long as its events
take to process."""

from __future__ import annotations

import asyncio
import heapq
from asyncio import events
from asyncio.base_events import MAXIMUM_SELECT_TIMEOUT


class SimulationDeadlock(RuntimeError):
    """Nothing is ready and nothing is scheduled, yet the simulation is not finished."""


class _ClockAdvancer:
    """Stands in for the selector asyncio's loop waits on: it has no file descriptors, and
    "waiting" `timeout` seconds moves the virtual clock that far at once."""

    def __init__(self, loop: VirtualClockLoop):
        self._loop = loop

    def select(self, timeout: float | None) -> list:
        if timeout is None:
            self._loop.stalled()
            return []
        self._loop.advance(timeout)
        return []

    def close(self) -> None:
        pass


class VirtualClockLoop(asyncio.BaseEventLoop):
    """Single-threaded; no sockets, subprocesses or signals (a simulation needs none)."""

    def __init__(self, start: float = 0.0):
        super().__init__()
        self._now = start
        self._selector = _ClockAdvancer(self)
        self.on_stall = None        # called when nothing is ready nor scheduled; it must
                                    # make something ready (fail the waits), or it raises

    def stalled(self) -> None:
        handler, self.on_stall = self.on_stall, None       # once: a second stall raises
        if handler is not None:
            handler()
        if not self._ready and not self._scheduled:
            raise SimulationDeadlock("the simulation waits on something no simulated event "
                                     "will ever bring (nothing scheduled, nothing ready)")

    def time(self) -> float:
        return self._now

    def _run_once(self) -> None:
        """One turn of asyncio's loop, as BaseEventLoop._run_once takes it, without a selector
        to poll: with nothing ready, wait (the clock jumps to the next timer); make the timers
        now due ready; run the callbacks ready at this point. A simulation takes two turns per
        engine step; this spares them the calls that poll without waiting, process (no) I/O
        events and read the clock. Debug mode, and a queue that holds cancelled timers, take
        BaseEventLoop's turn (it times callbacks and drops cancelled timers)."""
        if self._debug or self._timer_cancelled_count:
            super()._run_once()
            return
        ready, scheduled = self._ready, self._scheduled
        if not ready and not self._stopping:
            self._selector.select(None if not scheduled else min(
                max(0, scheduled[0]._when - self._now), MAXIMUM_SELECT_TIMEOUT))
        due = self._now + self._clock_resolution
        while scheduled and scheduled[0]._when < due:
            timer = heapq.heappop(scheduled)
            timer._scheduled = False
            ready.append(timer)
        for _ in range(len(ready)):
            handle = ready.popleft()
            if not handle._cancelled:
                handle._run()

    def call_soon(self, callback, *args, context=None) -> events.Handle:
        """BaseEventLoop.call_soon without its checks when the loop is open and not in debug
        mode: every future that settles calls it, at least once per simulated token."""
        if self._debug or self._closed:
            return super().call_soon(callback, *args, context=context)
        handle = events.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            self._now += seconds

    def _process_events(self, event_list) -> None:
        pass

    def _write_to_self(self) -> None:
        pass
