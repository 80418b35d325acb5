"""Idle waiting without spinning: sleep from about 0.5 ms doubling to a cap, reset on activity."""

from __future__ import annotations

import asyncio
import time


class Backoff:
    def __init__(self, first: float = 0.0005, cap: float = 0.02):
        self.first, self.cap = first, cap
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    def next_delay(self) -> float:
        """How long to wait now (the wait itself is the caller's)."""
        delay = self.delay
        self.delay = min(self.delay * 2, self.cap)
        return delay

    def sleep(self) -> None:
        time.sleep(self.next_delay())

    async def sleep_async(self) -> None:
        await asyncio.sleep(self.next_delay())
