"""What happened to one request across engines, for its output record (pure bookkeeping)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RequestTrace:
    arrival: float = field(default_factory=time.monotonic)
    started: float | None = None            # the router began working on it
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished: float | None = None
    finish_reason: str | None = None
    engines: set[int] = field(default_factory=set)
    kv_bytes: int = 0
    prefix_matched: int = 0
    fallbacks: int = 0
    strategy: str | None = None

    def tokens_arrived(self, count: int) -> None:
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
        self.token_times.extend([now] * count)

    def metrics(self, router: str) -> dict:
        end = self.finished or time.monotonic()
        started = self.started or self.arrival
        ttft = None if self.first_token is None else self.first_token - started
        n = len(self.token_times)
        tpot = (self.token_times[-1] - self.first_token) / (n - 1) if n > 1 else None
        return {"ttft": ttft, "tpot": tpot, "jct": end - started,
                "queue_time": started - self.arrival, "prefix_matched": self.prefix_matched,
                "kv_bytes": self.kv_bytes, "engines": sorted(self.engines),
                "transfer_fallbacks": self.fallbacks, "router": router,
                "strategy": self.strategy}
