"""The job's state as Prometheus text exposition (pure formatting and bookkeeping)."""

from __future__ import annotations

import bisect
from collections.abc import Mapping

# seconds; the last bucket is +Inf
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
ENGINE_GAUGES = {"running": "sequences running", "waiting": "sequences waiting",
                 "pages_used": "KV pages in use", "pages_total": "KV pages in the pool"}
ENGINE_COUNTERS = {"prefill_tokens": "prompt tokens computed",
                   "decode_tokens": "tokens decoded", "requests_aborted": "requests aborted"}


class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float | None) -> None:
        if value is None:
            return
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        lines, running = [f"# TYPE {name} histogram"], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            running += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return lines + [f"{name}_sum {self.total:.6f}", f"{name}_count {running}"]


def render(requests: Mapping[str, int], in_flight: int, generated_tokens: int,
           engines: Mapping[int, Mapping], histograms: Mapping[str, Histogram]) -> str:
    """`requests`: finished requests by outcome; `engines`: each engine's latest stats."""
    lines = ["# TYPE mpiserve_requests_total counter"]
    lines += [f'mpiserve_requests_total{{outcome="{k}"}} {v}' for k, v in requests.items()]
    lines += ["# TYPE mpiserve_requests_in_flight gauge",
              f"mpiserve_requests_in_flight {in_flight}",
              "# TYPE mpiserve_generated_tokens_total counter",
              f"mpiserve_generated_tokens_total {generated_tokens}"]
    for key, kind in [*((k, "gauge") for k in ENGINE_GAUGES),
                      *((k, "counter") for k in ENGINE_COUNTERS)]:
        name = f"mpiserve_engine_{key}" + ("_total" if kind == "counter" else "")
        help_text = ENGINE_GAUGES.get(key) or ENGINE_COUNTERS[key]
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{rank="{rank}",role="{stats.get("role", "")}"}} {stats.get(key, 0)}'
                  for rank, stats in sorted(engines.items())]
    for name, histogram in histograms.items():
        lines += histogram.lines(name)
    return "\n".join(lines) + "\n"
