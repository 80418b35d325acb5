"""Frozen pictures of a running job, and the collector that makes them from the engines' latest
stats, the batch tally and the cluster's counters (pure: no MPI, no terminal)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

MB = 1e6
LATENCY_KEYS = ("ttft", "tpot", "jct")


STALLED_AFTER_S = 3.0


@dataclass(frozen=True)
class EngineRow:
    rank: int
    host: str
    role: str
    running: int = 0
    waiting: int = 0
    pages_used: int = 0
    pages_total: int = 0
    prefix_hit_rate: float | None = None      # cached prompt tokens / prompt tokens looked up
    prefill_tps: float = 0.0                  # prompt tokens computed per second
    decode_tps: float = 0.0                   # tokens decoded per second
    kv_mb_sent: float = 0.0
    kv_mb_received: float = 0.0
    transfer_failures: int = 0
    fallbacks: int = 0
    busy_fraction: float = 0.0                # share of the last interval spent in engine steps
    silent_s: float = 0.0                     # seconds since rank 0 last heard from it

    @property
    def stalled(self) -> bool:
        """Silent for longer than a few heartbeats (they come at least every second)."""
        return self.silent_s >= STALLED_AFTER_S

    @property
    def pages_free(self) -> int:
        return self.pages_total - self.pages_used


@dataclass(frozen=True)
class LatencySummary:
    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


@dataclass(frozen=True)
class TimelinePoint:
    elapsed: float
    tokens_per_s: float
    busy: tuple[tuple[int, float], ...]       # (rank, busy fraction) per engine


@dataclass(frozen=True)
class JobSnapshot:
    elapsed: float
    total: int                                # records in the input
    done: int                                 # records written by this run (completions, errors)
    failed: int                               # of those, error records
    skipped: int                              # already in the output from an earlier run
    in_flight: int
    eta_s: float | None
    engines: tuple[EngineRow, ...]
    ttft: LatencySummary
    tpot: LatencySummary
    jct: LatencySummary
    throughput: tuple[float, ...]             # generated tokens/s per interval, oldest first
    generated_tokens: int
    strategies: tuple[tuple[str, int], ...]   # most used first
    errors: tuple[str, ...]                   # the latest few
    transfer_failures: int
    router: str
    model: str
    interrupted: bool
    note: str = ""                             # e.g. that the weights are random

    @property
    def completed(self) -> int:
        return self.done - self.failed

    @property
    def fraction(self) -> float:
        """Share of the input answered, counting records done by earlier runs."""
        return min(1.0, (self.skipped + self.done) / self.total) if self.total else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second over the whole run."""
        return self.generated_tokens / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def kv_mb_moved(self) -> float:
        return sum(e.kv_mb_sent for e in self.engines)

    @property
    def fallbacks(self) -> int:
        return sum(e.fallbacks for e in self.engines)


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) of sorted values, interpolated linearly between ranks."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values) -> LatencySummary:
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return LatencySummary()
    return LatencySummary(len(ordered), sum(ordered) / len(ordered), percentile(ordered, 50),
                          percentile(ordered, 90), percentile(ordered, 99))


def latency_summaries(latencies: Sequence[Mapping]) -> dict[str, LatencySummary]:
    return {key: summarize(m.get(key) for m in latencies) for key in LATENCY_KEYS}


def eta(total: int, skipped: int, done: int, elapsed: float) -> float | None:
    """Seconds left at this run's pace so far; None until something was done."""
    remaining = total - skipped - done
    if total <= 0 or done <= 0 or elapsed <= 0:
        return 0.0 if total > 0 and remaining <= 0 else None
    return max(0.0, remaining) * elapsed / done


class _EngineRates:
    """Rates of one engine from the last two distinct stats it sent (by the engine's clock)."""

    def __init__(self):
        self.base: Mapping | None = None
        self.rates = {"prefill_tps": 0.0, "decode_tps": 0.0, "busy_fraction": 0.0}

    def update(self, stats: Mapping) -> dict[str, float]:
        base = self.base
        if base is not None and stats.get("time", 0) > base.get("time", 0):
            span = stats["time"] - base["time"]
            self.rates = {
                "prefill_tps": _delta(stats, base, "prefill_tokens") / span,
                "decode_tps": _delta(stats, base, "decode_tokens") / span,
                "busy_fraction": min(1.0, max(0.0, _delta(stats, base, "busy_s") / span))}
        if base is None or stats.get("time", 0) > base.get("time", 0):
            self.base = stats
        return self.rates


def _delta(now: Mapping, before: Mapping, key: str) -> float:
    return now.get(key, 0) - before.get(key, 0)


def _with_tp(role: str, tp: int) -> str:
    """A tensor-parallel engine's role with its rank count: "decode TP2"."""
    return f"{role} TP{tp}" if tp > 1 else role


def engine_row(rank: int, role: str, stats: Mapping | None,
               rates: Mapping[str, float]) -> EngineRow:
    if stats is None:                         # not heard from yet
        return EngineRow(rank, "", role)
    queried = stats.get("prefix_query_tokens", 0)
    return EngineRow(
        rank=rank, host=stats.get("host", ""), role=_with_tp(stats.get("role", role),
                                                              stats.get("tp", 1)),
        running=stats.get("running", 0), waiting=stats.get("waiting", 0),
        pages_used=stats.get("pages_used", 0), pages_total=stats.get("pages_total", 0),
        prefix_hit_rate=stats.get("prefix_hit_tokens", 0) / queried if queried else None,
        kv_mb_sent=stats.get("kv_bytes_sent", 0) / MB,
        kv_mb_received=stats.get("kv_bytes_received", 0) / MB,
        transfer_failures=stats.get("transfers_failed", 0), fallbacks=stats.get("fallbacks", 0),
        **rates)


class Collector:
    """Turns successive (engine stats, tally, cluster counters, now) into JobSnapshots.

    Rates come from the change between calls: engine rates by the engines' own clocks, the
    job's token rate by `now` (tokens count when their request completes). `timeline` keeps
    every interval for the run report.
    `info` holds the job's configuration: `router`, `model` and `engines` ({rank: role})."""

    def __init__(self, info: Mapping, history: int = 60, latest_errors: int = 5,
                 min_interval_s: float = 0.2):
        self.info = info
        self.history = history
        self.latest_errors = latest_errors
        self.min_interval_s = min_interval_s        # a shorter one waits to join the next
        self.timeline: list[TimelinePoint] = []
        self._engines: dict[int, _EngineRates] = {}
        self._last: tuple[float, int] | None = None        # (now, generated tokens)
        self._latency: tuple[int, dict[str, LatencySummary]] = (0, latency_summaries([]))

    def collect(self, stats: Mapping[int, Mapping], tally, strategies: Mapping[str, int],
                failed_transfers: int, now: float,
                silent_s: Mapping[int, float] | None = None) -> JobSnapshot:
        elapsed = max(0.0, now - tally.started)
        rows = self._rows(stats, silent_s or {})
        self._note_interval(now, elapsed, tally, rows)
        latency = self._latencies(tally.latencies)
        done = tally.completed + tally.failed
        return JobSnapshot(
            elapsed=elapsed, total=tally.total, done=done, failed=tally.failed,
            skipped=tally.skipped, in_flight=max(0, tally.in_flight),
            eta_s=eta(tally.total, tally.skipped, done, elapsed), engines=rows,
            ttft=latency["ttft"], tpot=latency["tpot"], jct=latency["jct"],
            throughput=tuple(p.tokens_per_s for p in self.timeline[-self.history:]),
            generated_tokens=tally.generated_tokens,
            strategies=tuple(sorted(strategies.items(), key=lambda kv: (-kv[1], kv[0]))),
            errors=tuple(tally.errors[-self.latest_errors:]), transfer_failures=failed_transfers,
            router=str(self.info.get("router", "")), model=str(self.info.get("model", "")),
            interrupted=tally.interrupted, note=str(self.info.get("note", "")))

    def _rows(self, stats: Mapping[int, Mapping],
              silent_s: Mapping[int, float]) -> tuple[EngineRow, ...]:
        roles = {int(rank): role for rank, role in self.info.get("engines", {}).items()}
        rows = []
        for rank in sorted(set(roles) | set(stats)):
            rates = self._engines.setdefault(rank, _EngineRates())
            latest = stats.get(rank)
            values = rates.update(latest) if latest is not None else rates.rates
            row = engine_row(rank, roles.get(rank, "?"), latest, values)
            rows.append(replace(row, silent_s=silent_s.get(rank, 0.0)))
        return tuple(rows)

    def _note_interval(self, now: float, elapsed: float, tally, rows) -> None:
        last_now, last_tokens = self._last or (tally.started, 0)
        if now - last_now < self.min_interval_s:       # a rate over a sliver would spike
            return
        rate = (tally.generated_tokens - last_tokens) / (now - last_now)
        self._last = (now, tally.generated_tokens)
        busy = tuple((row.rank, row.busy_fraction) for row in rows)
        self.timeline.append(TimelinePoint(elapsed, rate, busy))

    def _latencies(self, latencies: Sequence[Mapping]) -> dict[str, LatencySummary]:
        if self._latency[0] != len(latencies):            # sort again only when new ones came
            self._latency = (len(latencies), latency_summaries(latencies))
        return self._latency[1]
