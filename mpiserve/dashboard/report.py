"""The run report: `summary.json` (configuration, per-engine figures, totals, latencies),
`timeline.csv` (throughput and engine utilization per interval), `steps.json` (a sample of each
engine's timed steps) and PNG plots (latency CDFs,
throughput over time, engine utilization) in the run directory.
Plots need matplotlib (the `plots` extra); without it the summary says so."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from .snapshot import JobSnapshot, TimelinePoint, latency_summaries

STEPS_FILE = "steps.json"
MAX_LISTED = 100                 # errors and failed transfers kept in the summary
PLOTS_MISSING = "plots skipped: matplotlib is not installed (pip install 'mpiserve[plots]')"


def write_report(run_dir: Path, info: Mapping, snap: JobSnapshot, stats: Mapping[int, Mapping],
                 tally, failed_transfers: Sequence[str],
                 timeline: Sequence[TimelinePoint]) -> dict:
    """Write summary.json and the plots into `run_dir`; returns the summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = build_summary(info, snap, stats, tally, failed_transfers)
    write_timeline(run_dir / "timeline.csv", timeline)
    summary["timeline"] = "timeline.csv"
    if write_step_timings(run_dir / STEPS_FILE, stats):
        summary["steps"] = STEPS_FILE
    summary.update(write_plots(run_dir, tally.latencies, timeline, info))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def build_summary(info: Mapping, snap: JobSnapshot, stats: Mapping[int, Mapping], tally,
                  failed_transfers: Sequence[str]) -> dict:
    engines = {str(rank): engine_figures(stats[rank], snap.elapsed) for rank in sorted(stats)}
    return {
        "config": dict(info),
        "engines": engines,
        "totals": totals(snap, stats, tally, failed_transfers),
        "latency": {key: asdict(value)
                    for key, value in latency_summaries(tally.latencies).items()},
        "strategies": dict(snap.strategies),
        "errors": list(tally.errors[:MAX_LISTED]),
        "failed_transfers": list(failed_transfers[:MAX_LISTED]),
    }


def engine_figures(stats: Mapping, wall_s: float) -> dict:
    figures = {key: value for key, value in stats.items() if key not in ("time", "step_timings")}
    queried = stats.get("prefix_query_tokens", 0)
    figures["prefix_hit_rate"] = stats.get("prefix_hit_tokens", 0) / queried if queried else None
    figures["busy_fraction"] = min(1.0, stats.get("busy_s", 0) / wall_s) if wall_s > 0 else None
    return figures


def totals(snap: JobSnapshot, stats: Mapping[int, Mapping], tally,
           failed_transfers: Sequence[str]) -> dict:
    def engine_sum(key: str) -> int:
        return sum(s.get(key, 0) for s in stats.values())
    return {
        "records": snap.total, "completed": snap.completed, "failed": snap.failed,
        "skipped": snap.skipped, "abandoned": tally.abandoned, "interrupted": snap.interrupted,
        "generated_tokens": snap.generated_tokens, "wall_time_s": snap.elapsed,
        "throughput_tokens_per_s": snap.tokens_per_s,
        "requests_per_s": snap.done / snap.elapsed if snap.elapsed > 0 else 0.0,
        "kv_bytes_moved": engine_sum("kv_bytes_sent"),
        "transfer_failures": len(failed_transfers),
        "engine_transfer_failures": engine_sum("transfers_failed"),
        "fallbacks": engine_sum("fallbacks"),
    }


def write_step_timings(path: Path, stats: Mapping[int, Mapping]) -> bool:
    """The engines' samples of timed steps (`engine.step_timings`), by rank, for `mpiserve
    profile --from-run`; False (nothing written) when no engine sent one."""
    engines = {str(rank): {"role": s.get("role"), "host": s.get("host"), "tp": s.get("tp"),
                           **s["step_timings"]}
               for rank, s in sorted(stats.items()) if "step_timings" in s}
    if engines:
        path.write_text(json.dumps({"engines": engines}) + "\n")
    return bool(engines)


def write_timeline(path: Path, timeline: Sequence[TimelinePoint]) -> None:
    """One row per interval: seconds since start, generated tokens/s, busy fraction per rank."""
    ranks = sorted({rank for p in timeline for rank, _ in p.busy})
    with path.open("w", newline="") as file:
        out = csv.writer(file)
        out.writerow(["elapsed_s", "tokens_per_s", *(f"busy_rank{r}" for r in ranks)])
        for p in timeline:
            busy = dict(p.busy)
            out.writerow([f"{p.elapsed:.3f}", f"{p.tokens_per_s:.1f}",
                          *(f"{busy[r]:.3f}" if r in busy else "" for r in ranks)])


# ---- plots ---------------------------------------------------------------------------------------
def write_plots(run_dir: Path, latencies: Sequence[Mapping], timeline: Sequence[TimelinePoint],
                info: Mapping) -> dict:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return {"plots": [], "plots_note": PLOTS_MISSING}
    drawings = {"latency_cdf.png": lambda fig: latency_cdfs(fig, latencies),
                "throughput.png": lambda fig: throughput(fig, timeline),
                "utilization.png": lambda fig: utilization(fig, timeline, info)}
    for name, draw in drawings.items():
        figure = Figure(figsize=(8, 4.5), layout="constrained")
        FigureCanvasAgg(figure)
        draw(figure)
        figure.savefig(run_dir / name, dpi=100)
    return {"plots": list(drawings)}


def latency_cdfs(figure, latencies: Sequence[Mapping]) -> None:
    for axes, key in zip(figure.subplots(1, 2), ("ttft", "jct"), strict=True):
        values = sorted(m[key] for m in latencies if m.get(key) is not None)
        fractions = [(i + 1) / len(values) for i in range(len(values))]
        axes.step(values, fractions, where="post")
        axes.set(title=f"{key.upper()} CDF ({len(values)} requests)", xlabel="seconds",
                 ylabel="fraction of requests", ylim=(0, 1.02))
        axes.grid(alpha=0.3)


def throughput(figure, timeline: Sequence[TimelinePoint]) -> None:
    axes = figure.subplots()
    axes.plot([p.elapsed for p in timeline], [p.tokens_per_s for p in timeline])
    axes.set(title="generated tokens per second", xlabel="seconds since start",
             ylabel="tokens/s")
    axes.grid(alpha=0.3)


def utilization(figure, timeline: Sequence[TimelinePoint], info: Mapping) -> None:
    axes = figure.subplots()
    roles = {str(rank): role for rank, role in info.get("engines", {}).items()}
    ranks = sorted({rank for p in timeline for rank, _ in p.busy})
    for rank in ranks:
        points = [(p.elapsed, busy) for p in timeline for r, busy in p.busy if r == rank]
        axes.plot(*zip(*points, strict=True), label=f"rank {rank} ({roles.get(str(rank), '?')})")
    axes.set(title="engine utilization (share of time in engine steps)",
             xlabel="seconds since start", ylabel="busy fraction", ylim=(0, 1.05))
    if ranks:
        axes.legend()
    axes.grid(alpha=0.3)
