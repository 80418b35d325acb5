"""What happened to one request across engines, for its output record (pure bookkeeping).

Times are `clock.now()` seconds (time.monotonic; the virtual clock under `mpiserve simulate`).
`arrival` is when the request arrived: its scheduled arrival time when the input gives
`arrival_s`, else when rank 0 read it. `ttft`, `jct` and `queue_time` count from the arrival,
so time spent waiting to be admitted is part of them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from itertools import repeat

from . import clock

ITL_DIGITS = 4                               # inter-token latencies rounded to 0.1 ms


@dataclass
class SampleTrace:
    """One of a request's n samples as it arrived: its tokens, their log probabilities (when
    asked) and how it finished."""
    tokens: list[int] = field(default_factory=list)
    logprobs: list | None = None
    finish_reason: str | None = None


@dataclass
class RequestTrace:
    arrival: float = field(default_factory=clock.now)
    started: float | None = None            # the router began working on it
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished: float | None = None
    finish_reason: str | None = None
    generations: int = 0                     # start_generate calls (the contract allows one)
    engines: set[int] = field(default_factory=set)
    reserved: set[int] = field(default_factory=set)   # ranks holding prep_recv pages for it
                                                      # (changed by Cluster.set_reserved)
    kv_bytes: int = 0
    prefix_matched: int = 0
    fallbacks: int = 0
    strategy: str | None = None
    samples: dict[int, SampleTrace] = field(default_factory=dict)
    prompt_logprobs: list | None = None

    def sample_arrived(self, index: int, tokens: list[int], logprobs: list | None,
                       finish_reason: str | None) -> None:
        sample = self.samples.get(index)
        if sample is None:                   # (not setdefault: no SampleTrace per token)
            sample = self.samples[index] = SampleTrace()
        sample.tokens.extend(tokens)
        if logprobs is not None:
            if sample.logprobs is None:
                sample.logprobs = []
            sample.logprobs.extend(logprobs)
        sample.finish_reason = finish_reason or sample.finish_reason

    def tokens_arrived(self, count: int, now: float | None = None) -> None:
        now = clock.now() if now is None else now
        if self.first_token is None:
            self.first_token = now
        if count == 1:                       # the usual case, once per token
            self.token_times.append(now)
        else:
            self.token_times.extend([now] * count)

    def inter_token_latencies(self) -> list[float]:
        """Seconds between consecutive generated tokens as rank 0 received them (tokens that
        arrive together count 0), rounded to 0.1 ms; their mean is the TPOT."""
        times = self.token_times
        # map rather than a comprehension: one gap per token of every request, so C loops
        return list(map(round, map(operator.sub, times[1:], times),
                        repeat(ITL_DIGITS, len(times) - 1)))

    def metrics(self, router: str, itl: bool = False) -> dict:
        end = self.finished or clock.now()
        started = self.started or self.arrival
        ttft = None if self.first_token is None else self.first_token - self.arrival
        n = len(self.token_times)
        tpot = (self.token_times[-1] - self.first_token) / (n - 1) if n > 1 else None
        metrics = {"ttft": ttft, "tpot": tpot, "jct": end - self.arrival,
                   "queue_time": started - self.arrival, "prefix_matched": self.prefix_matched,
                   "kv_bytes": self.kv_bytes, "engines": sorted(self.engines),
                   "transfer_fallbacks": self.fallbacks, "router": router,
                   "strategy": self.strategy}
        if itl:
            metrics["itl"] = self.inter_token_latencies()
        return metrics
