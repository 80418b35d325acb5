"""An asyncio event loop whose clock is virtual: when no callback is ready, time jumps to the
next scheduled one instead of waiting for it. `asyncio.sleep`, `wait_for` and `loop.time()`
behave as usual, so router code runs unchanged; a simulated hour takes as long as its events
take to process."""

from __future__ import annotations

import asyncio


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

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            self._now += seconds

    def _process_events(self, event_list) -> None:
        pass

    def _write_to_self(self) -> None:
        pass
