"""Serving metrics from one run's output records, as vLLM's serving benchmark reports them
(pure).

Per request (from each record's `metrics`, all measured on rank 0 from the request's arrival):
TTFT, TPOT (mean time per output token after the first; requests of one token have none), ITL
(every gap between consecutive tokens, pooled over requests; recorded with `--record-itl`) and
JCT (arrival to last token). The run lasts from the first arrival to the last completion;
throughputs are per second of that: requests, output tokens, prompt + output tokens, and goodput
(requests whose TTFT and TPOT both meet the SLOs).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation (numpy's default); None if empty."""
    data = sorted(values)
    if not data:
        return None
    position = (len(data) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (position - low)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def distribution(name: str, values: Sequence[float]) -> dict:
    return {f"mean_{name}": mean(values), f"p50_{name}": percentile(values, 50),
            f"p99_{name}": percentile(values, 99)}


def completions(records: Iterable[Mapping]) -> tuple[list[Mapping], list[Mapping]]:
    """Split output records into completed ones and errors."""
    done, failed = [], []
    for record in records:
        response = record.get("response") or {}
        ok = record.get("error") is None and response.get("status_code") == 200
        (done if ok else failed).append(record)
    return done, failed


def summarize(records: Iterable[Mapping], arrivals: Mapping[str, float],
              slo_ttft: float | None = None, slo_tpot: float | None = None) -> dict:
    """Metrics of one run. `arrivals` maps custom_id to arrival_s (missing: 0)."""
    done, failed = completions(records)
    ttft, tpot, itl, jct, queue = [], [], [], [], []
    prompt_tokens = output_tokens = good = 0
    first = min(arrivals.values(), default=0.0)
    last = first
    strategies: Counter[str] = Counter()
    for record in done:
        body = record["response"]["body"]
        m, usage = body["metrics"], body["usage"]
        arrival = arrivals.get(record["custom_id"], 0.0)
        last = max(last, arrival + m["jct"])
        jct.append(m["jct"])
        if m.get("ttft") is not None:
            ttft.append(m["ttft"])
        if m.get("tpot") is not None:
            tpot.append(m["tpot"])
        if m.get("queue_time") is not None:
            queue.append(m["queue_time"])
        itl.extend(m.get("itl") or [])
        prompt_tokens += usage["prompt_tokens"]
        output_tokens += usage["completion_tokens"]
        strategies[m.get("strategy") or "none"] += 1
        meets_ttft = slo_ttft is None or (m.get("ttft") is not None and m["ttft"] <= slo_ttft)
        meets_tpot = slo_tpot is None or m.get("tpot") is None or m["tpot"] <= slo_tpot
        good += meets_ttft and meets_tpot
    duration = last - first
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: None)
    summary = {"completed": len(done), "failed": len(failed), "duration_s": duration,
               "throughput": per_s(len(done)), "output_throughput": per_s(output_tokens),
               "total_token_throughput": per_s(prompt_tokens + output_tokens),
               "goodput": per_s(good), "good_requests": good,
               "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
               "slo_ttft": slo_ttft, "slo_tpot": slo_tpot,
               "mean_queue_time": mean(queue), "strategies": dict(sorted(strategies.items()))}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("jct", jct)):
        summary.update(distribution(name, values))
    return summary
