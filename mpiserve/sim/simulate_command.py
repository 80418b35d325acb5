"""`mpiserve simulate`: `mpiserve bench`'s workloads and routers on simulated engines.

    mpiserve simulate --workload long --routers round_robin,pd,balanced_pd:auto \\
        --rates 0.1,0.2 --prefill 1 --decode 1 --profile profile.json --out results

    mpiserve simulate --workload chat --prefill 1 --decode 1 --tp 4 --hardware h100 \\
        --model-config llama-70b/config.json --dtype fp8 --out results

Each router serves the workload in a fresh simulation; the rows (one per workload, router and
rate) go to `strategies.json`, `.md` and `strategies_<workload>.png` as `mpiserve bench` writes
them, each marked `"simulated": true`, beside measured rows of the same workload.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from ..bench.metrics import summarize
from ..bench.serving import (
    DEFAULT_ROUTERS,
    ROW_KEYS,
    SEED,
    parse_rates,
    parse_routers,
    write_reports,
)
from ..bench.workloads import WORKLOADS
from ..errors import MpiserveError
from ..option_types import seconds
from .cost_choice import SimSetup, sim_setup
from .fresh_router import fresh_router
from .simulation import SimLayout, simulate
from .workload_input import file_requests, observed_rate, workload_requests


def say(message: str) -> None:
    print(f"mpiserve simulate: {message}", file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser, layout: bool = True) -> None:
    """The options of `mpiserve simulate`; without `layout`, those of `mpiserve plan`, which
    chooses --prefill, --decode and --tp itself."""
    parser.add_argument("--workload", default="long",
                        help=f"{', '.join(sorted(WORKLOADS))}, or an OpenAI batch JSONL file "
                        "with arrival_s (default long)")
    parser.add_argument("--routers", default=DEFAULT_ROUTERS,
                        help="comma list, as for mpiserve bench (default %(default)s)")
    parser.add_argument("--rates", help="comma list of request rates, requests/s (default: "
                        "the workload's; a file's arrivals are its own)")
    parser.add_argument("--requests", "--num-requests", dest="num_requests", type=int,
                        help="requests per run (default: the workload's)")
    parser.add_argument("--seed", type=int, default=SEED, help="workload seed")
    if layout:
        parser.add_argument("--prefill", type=int, default=1,
                            help="prefill engines (default 1)")
        parser.add_argument("--decode", type=int, default=1, help="decode engines (default 1)")
        parser.add_argument("--tp", type=int, default=1, help="devices per engine (default 1)")
    cost = parser.add_argument_group("cost model (one of)")
    cost.add_argument("--profile", help="JSON profile written by `mpiserve profile`")
    cost.add_argument("--hardware", help="h100, h200, a100, or a YAML/JSON spec file "
                      "(with --model-config)")
    cost.add_argument("--model-config", help="the model's config.json (file or directory)")
    cost.add_argument("--dtype", choices=["bf16", "fp8"], default="bf16",
                      help="weight dtype for --hardware (default bf16)")
    engine = parser.add_argument_group("simulated engines (as mpiserve run's)")
    engine.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    engine.add_argument("--num-pages", type=int, help="KV pages per engine (default: what "
                        "the profile measured, or what fits next to the weights)")
    engine.add_argument("--max-num-seqs", type=int, default=64,
                        help="sequences an engine runs at once (default 64)")
    engine.add_argument("--max-batch-tokens", type=int, default=1024,
                        help="tokens per engine step (default 1024)")
    engine.add_argument("--control-latency", type=seconds(0, inclusive=True), default=0.0,
                        metavar="SECONDS",
                        help="one-way delay of every control message between rank 0 and an "
                             "engine: calls, their answers and token updates (default 0)")
    engine.add_argument("--engines-per-host", type=int, default=1, metavar="N",
                        help="engines that share a host, in rank order, and slow each other's "
                             "steps as the profile's co-run factors say (CPU engines share "
                             "caches and memory bandwidth; a roofline's devices are each "
                             "engine's own) (default 1)")
    engine.add_argument("--tokenizer", help="checkpoint directory whose tokenizer turns a "
                        "file's text prompts into tokens")
    parser.add_argument("--slo-ttft", type=float, help="TTFT SLO in seconds for goodput")
    parser.add_argument("--slo-tpot", type=float, help="TPOT SLO in seconds for goodput")
    parser.add_argument("--out", default="results", help="output directory (default results)")


def run_simulate(args, argv: list[str] | None = None) -> int:
    try:
        setup = sim_setup(args)
        routers = parse_routers(args.routers)
        runs = workload_runs(args, setup)
    except (ValueError, MpiserveError) as exc:
        say(f"error: {exc}")
        return 2
    command = "mpiserve simulate" + ("" if not argv else " " + shlex.join(argv))
    rows = []
    for name, rate, requests, spec in runs:
        for run in routers:
            rows.append(_row(args, setup, name, rate, requests, spec, run, command))
    write_reports(Path(args.out), runs[0][0], rows)
    say(f"wrote {Path(args.out) / 'strategies.json'}, strategies.md and "
        f"strategies_{runs[0][0]}.png")
    return 0 if all(r["completed"] == r["num_requests"] for r in rows) else 1


def workload_runs(args, setup: SimSetup) -> list[tuple]:
    """(workload name, rate, requests, workload spec or None) for each rate."""
    if args.num_requests is not None and args.num_requests < 1:
        raise ValueError("--requests must be at least 1")
    if args.workload in WORKLOADS:
        workload = WORKLOADS[args.workload]
        rates = parse_rates(args.rates) if args.rates else list(workload.rates)
        count = args.num_requests or workload.num_requests
        return [(workload.name, rate, workload_requests(workload, rate, count, args.seed,
                                                        setup.config.vocab_size), workload)
                for rate in rates]
    if args.rates:
        raise ValueError("--rates does not apply to a workload file: its arrival_s set them")
    requests = file_requests(args.workload, *setup.tokenizer_and_limits(args.tokenizer))
    requests = requests[:args.num_requests] if args.num_requests else requests
    return [(Path(args.workload).stem, observed_rate(requests), requests, None)]


def _row(args, setup: SimSetup, name, rate, requests, spec, run, command) -> dict:
    started = time.perf_counter()
    result = simulate(requests, fresh_router(run.router), run.router,
                      SimLayout(args.prefill, args.decode, args.tp), setup.cost, setup.config,
                      dict(a.split("=", 1) for a in run.router_args))
    wall = time.perf_counter() - started
    arrivals = {r.custom_id: r.arrival_s for r in requests}
    slo_ttft = args.slo_ttft if args.slo_ttft is not None else getattr(spec, "slo_ttft", None)
    slo_tpot = args.slo_tpot if args.slo_tpot is not None else getattr(spec, "slo_tpot", None)
    summary = summarize(result.records, arrivals, slo_ttft, slo_tpot)
    kv_bytes = sum(s.get("kv_bytes_sent", 0) for s in result.engine_stats.values())
    row = {"workload": name, "router": run.label, "rate": rate,
           **{k: summary.get(k) for k in ROW_KEYS[3:]}, **summary,
           "num_requests": len(requests), "prefill": args.prefill, "decode": args.decode,
           "tp": args.tp, "model": setup.label, "quick": False, "exit_code": 0,
           "wall_s": wall, "command": command, "run_command": command, "simulated": True,
           "cost_model": setup.cost.describe(), "virtual_s": result.virtual_s,
           "kv_bytes_sent": kv_bytes, "failure": result.failure}
    if result.failure:
        say(f"  FAILED: {result.failure}")
    say(f"{name} at {rate:g} req/s, router {run.label}: mean JCT {_s(row['mean_jct'])}, "
        f"p99 JCT {_s(row['p99_jct'])}, mean TTFT {_s(row['mean_ttft'])}, "
        f"{summary['completed']}/{len(requests)} done ({wall:.2f} s of CPU time)")
    return row


def _s(value) -> str:
    return "–" if value is None else f"{value:.3f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpiserve simulate",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    return run_simulate(parser.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
