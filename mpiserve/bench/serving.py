"""`mpiserve bench`: one serving workload under several routers, back to back.

    mpiserve bench --workload long --routers round_robin,pd,balanced_pd:0.1,balanced_pd:auto

For each request rate, the workload's requests (seeded token-id prompts, the same for every
router and rate; Poisson arrival times, the same for every router at one rate) are written as
one batch input with `arrival_s`, and each router serves it in a fresh
`mpiexec -n 1+P+D mpiserve run` job on the same model. The output records give each request's
TTFT, TPOT, inter-token latencies and JCT, all measured from its arrival; `metrics.summarize`
turns them into the figures vLLM's serving benchmark reports. Two short warm-up requests arrive
first, at 0 (the measured ones from 3 s on; 0.5 s with `--quick`), so the engines' first-use
costs are charged to no router; they are left out of the metrics.

Writes to `--out` (default `results/`): `strategies.json` (one row per workload, router and
rate; rows already there for other workloads, routers or rates are kept, the others replaced),
`strategies.md` (the tables with the exact commands) and `strategies_<workload>.png` (mean and
p99 JCT and mean TTFT against the rate, one line per router).

Routers: a built-in name or `path/to/file.py:function`; `balanced_pd:0.1` or `balanced_pd:auto`
sets balanced_pd's decode_fraction. The default model is the benchmark model of
`bench_model.BENCH` (the tiny `QUICK` one with `--quick`), built into the mpiserve cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..routers.balanced_pd import parse_fraction
from .report_files import write_report
from .workloads import (
    QUICK_WORKLOADS,
    WARMUP_PREFIX,
    WORKLOADS,
    Workload,
    batch_record,
    make_requests,
    with_warmup,
)

SEED = 20250305
ROW_KEYS = ("workload", "router", "rate", "mean_jct", "p99_jct", "mean_ttft", "mean_tpot",
            "throughput")
DEFAULT_ROUTERS = "round_robin,pd,balanced_pd:0.1,balanced_pd:auto"
QUICK_ROUTERS = "round_robin,balanced_pd:auto"
FRACTION_ROUTERS = ("balanced_pd",)      # NAME:VALUE sets decode_fraction
WARMUP_REQUESTS, WARMUP_S, WARMUP_QUICK_S = 2, 3.0, 0.5   # before the measured requests


@dataclass(frozen=True)
class RouterRun:
    label: str                  # as given in --routers
    router: str                 # --router of mpiserve run
    router_args: tuple[str, ...]    # KEY=VALUE for --router-arg


def parse_routers(text: str) -> list[RouterRun]:
    runs = []
    for spec in (s.strip() for s in text.split(",")):
        if not spec:
            continue
        name, sep, value = spec.partition(":")
        if sep and name in FRACTION_ROUTERS:
            try:
                parse_fraction(value)
            except ValueError:
                raise ValueError(f"--routers {spec}: the decode fraction must be a number "
                                 "in [0, 1] or auto") from None
            runs.append(RouterRun(spec, name, (f"decode_fraction={value}",)))
        else:
            runs.append(RouterRun(spec, spec, ()))
    if not runs:
        raise ValueError("--routers names no router")
    return runs


def parse_rates(text: str) -> list[float]:
    rates = [float(r) for r in text.split(",") if r.strip()]
    if not rates or any(not 0 < r < float("inf") for r in rates):
        raise ValueError(f"--rates {text}: give positive, finite requests per second")
    return rates


# ---- launching ---------------------------------------------------------------------------------
def find_mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if not found:
        raise SystemExit("mpiexec not found next to the Python interpreter nor on PATH")
    return found


def run_workers(module: str, ranks: int, argv: list[str]) -> int:
    """A benchmark module run again as `mpiexec -n ranks python -m module --worker ARGV`, one
    torch thread per rank; returns the launcher's exit code."""
    command = [find_mpiexec(), "-n", str(ranks), sys.executable, "-m", module, "--worker",
               *argv]
    return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode


def mpiserve_command() -> list[str]:
    beside = Path(sys.executable).parent / "mpiserve"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "mpiserve.cli"]


def run_arguments(run: RouterRun, prefill: int, decode: int, model: str, source: str,
                  output: str, extra: list[str]) -> list[str]:
    """`mpiserve run` arguments of one benchmark run (after the command itself)."""
    args = ["run", "--prefill", str(prefill), "--decode", str(decode), "--router", run.router]
    for arg in run.router_args:
        args += ["--router-arg", arg]
    return args + ["--model", model, "--input", source, "--output", output, "--dashboard", "off",
                   "--record-itl", *extra]


def launch(ranks: int, arguments: list[str], log: Path, timeout_s: float) -> tuple[int, float]:
    """Run `mpiexec -n ranks mpiserve ARGS`; returns (exit code, seconds). A run that outlives
    `timeout_s` is stopped (exit code -1)."""
    from .processes import kill_tree
    command = [find_mpiexec(), "-n", str(ranks), *mpiserve_command(), *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            code = -1
    return code, time.monotonic() - started


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- one workload ------------------------------------------------------------------------------
def resolve_model(args) -> tuple[str, str, int]:
    """(checkpoint directory, how the results name it, the largest usable token id + 1)."""
    from ..model.model_config import ModelConfig
    from ..model.tokenizer import Tokenizer
    from .bench_model import BENCH, QUICK, bench_model_dir
    if args.model:
        directory, label = args.model, Path(args.model).name
    else:
        shape = QUICK if args.quick else BENCH
        directory, label = str(bench_model_dir(shape)), f"{shape.name} ({shape.describe()})"
    limit = min(ModelConfig.from_dir(directory).vocab_size,
                Tokenizer.from_dir(directory).vocab_size)
    return directory, label, limit


def bench_workload(args, workload: Workload, command: str) -> tuple[list[dict], list[str]]:
    from .metrics import summarize
    routers = parse_routers(args.routers or (QUICK_ROUTERS if args.quick else DEFAULT_ROUTERS))
    rates = parse_rates(args.rates) if args.rates else list(workload.rates)
    num_requests = args.num_requests or workload.num_requests
    slo_ttft = args.slo_ttft if args.slo_ttft is not None else workload.slo_ttft
    slo_tpot = args.slo_tpot if args.slo_tpot is not None else workload.slo_tpot
    model, model_label, token_limit = resolve_model(args)
    ranks = 1 + args.prefill + args.decode
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mpiserve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    extra = list(args.run_arg)
    rows, failures = [], []
    try:
        for rate in rates:
            requests = with_warmup(make_requests(workload, rate, num_requests, args.seed,
                                                 token_limit),
                                   WARMUP_REQUESTS, WARMUP_QUICK_S if args.quick else WARMUP_S,
                                   token_limit)
            source = work / f"{workload.name}-rate{rate:g}.jsonl"
            source.write_text("".join(json.dumps(batch_record(r)) + "\n" for r in requests))
            arrivals = {r.custom_id: r.arrival_s for r in requests
                        if not r.custom_id.startswith(WARMUP_PREFIX)}
            timeout = args.run_timeout or (requests[-1].arrival_s + (240 if args.quick else 1800))
            for run in routers:
                label = run.label.replace(":", "-").replace("/", "_")
                tag = f"{workload.name}-rate{rate:g}-{label}"
                output = work / f"{tag}.out.jsonl"
                for stale in (output, Path(f"{output}.lock")):
                    stale.unlink(missing_ok=True)
                arguments = run_arguments(run, args.prefill, args.decode, model, str(source),
                                          str(output),
                                          extra + ["--run-dir", str(work / f"{tag}.run")])
                say(f"{workload.name} at {rate:g} req/s, router {run.label}: "
                    f"{num_requests} requests ...")
                code, seconds = launch(ranks, arguments, work / f"{tag}.log", timeout)
                measured = [r for r in read_records(output) if r.get("custom_id") in arrivals]
                summary = summarize(measured, arrivals, slo_ttft, slo_tpot)
                row = {"workload": workload.name, "router": run.label, "rate": rate,
                       **{k: summary.get(k) for k in ROW_KEYS[3:]}, **summary,
                       "num_requests": num_requests, "prefill": args.prefill,
                       "decode": args.decode, "model": model_label, "quick": bool(args.quick),
                       "exit_code": code, "wall_s": seconds, "command": command,
                       "run_command": run_command_text(ranks, run, args, extra)}
                rows.append(row)
                if code != 0 or summary["completed"] != num_requests:
                    failures.append(f"{tag}: exit {code}, {summary['completed']}/{num_requests} "
                                    f"completed (log: {work / f'{tag}.log'})")
                    say(f"  FAILED: {failures[-1]}")
                else:
                    say(f"  {seconds:.0f} s: mean JCT {row['mean_jct']:.2f} s, p99 JCT "
                        f"{row['p99_jct']:.2f} s, mean TTFT {row['mean_ttft']:.2f} s, "
                        f"{row['throughput']:.3f} req/s")
    finally:
        if not args.work_dir and not failures:
            shutil.rmtree(work, ignore_errors=True)
    if failures:
        say("some runs failed; their work files are kept in " + str(work))
    return rows, failures


def run_command_text(ranks: int, run: RouterRun, args, extra: list[str]) -> str:
    """The `mpiexec ... mpiserve run` line of one run, with placeholders for the files."""
    words = ["mpiexec", "-n", str(ranks), "mpiserve", "run", "--prefill", str(args.prefill),
             "--decode", str(args.decode), "--router", run.router]
    for arg in run.router_args:
        words += ["--router-arg", arg]
    words += ["--model", "MODEL_DIR" if not args.model else args.model, "--input", "IN.jsonl",
              "--output", "OUT.jsonl", "--dashboard", "off", "--record-itl", *extra]
    return shlex.join(words)


# ---- reports -----------------------------------------------------------------------------------
def merge_rows(path: Path, workload: str, rows: list[dict]) -> list[dict]:
    """The rows already in `path` that `rows` do not measure again (same workload, router,
    rate, and simulated or not), then `rows`."""
    def key(row):
        return (row.get("workload"), row.get("router"), row.get("rate"),
                bool(row.get("simulated")))
    fresh = {key(r) for r in rows}
    kept = []
    if path.exists():
        try:
            kept = [r for r in json.loads(path.read_text()) if key(r) not in fresh]
        except (ValueError, AttributeError):
            kept = []
    return kept + rows


def router_label(row: dict) -> str:
    """The router as tables and plots name it; `mpiserve simulate`'s rows are marked."""
    return row["router"] + (" (simulated)" if row.get("simulated") else "")


def _fmt(value, digits=2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    lines = ["# Serving strategies", "",
             "Each row is one `mpiexec` job serving the workload's requests at their Poisson "
             "arrival times (written by `mpiserve bench`); a row marked simulated is "
             "`mpiserve simulate`'s run of the same requests on a virtual clock. Latencies are "
             "seconds from a request's arrival; throughput and goodput are requests per second "
             "from the first arrival to the last completion; goodput counts requests meeting "
             "both SLOs. Two warm-up requests before the measured ones are left out (simulated "
             "runs have none).", ""]
    for workload in dict.fromkeys(r["workload"] for r in rows):
        group = [r for r in rows if r["workload"] == workload]
        first = group[0]
        spec = (QUICK_WORKLOADS if first.get("quick") else WORKLOADS).get(workload)
        lines += [f"## {workload}", "", f"Command: `{first['command']}`", "",
                  f"Each run: `{first['run_command']}`", "",
                  f"Workload: {spec.describe() if spec else workload}; "
                  f"{first['num_requests']} requests per run; {first['prefill']} prefill + "
                  f"{first['decode']} decode engines; model {first['model']}; SLOs: TTFT ≤ "
                  f"{first['slo_ttft']} s, TPOT ≤ {first['slo_tpot']} s.", "",
                  f"![JCT by router and rate](strategies_{workload}.png)", "",
                  "| router | rate (req/s) | throughput (req/s) | goodput (req/s) | mean TTFT | "
                  "p99 TTFT | mean TPOT | mean ITL | p99 ITL | mean JCT | p50 JCT | p99 JCT | "
                  "done |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(group, key=lambda r: r["rate"]):
            lines.append(
                f"| {router_label(r)} | {r['rate']:g} | {_fmt(r['throughput'], 3)} | "
                f"{_fmt(r['goodput'], 3)} | {_fmt(r['mean_ttft'])} | {_fmt(r['p99_ttft'])} | "
                f"{_fmt(r['mean_tpot'], 3)} | {_fmt(r['mean_itl'], 3)} | "
                f"{_fmt(r['p99_itl'], 3)} | {_fmt(r['mean_jct'])} | {_fmt(r['p50_jct'])} | "
                f"{_fmt(r['p99_jct'])} | {r['completed']}/{r['num_requests']} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], workload: str, path: Path) -> bool:
    """Mean JCT, p99 JCT and mean TTFT against the rate, one line per router."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    group = [r for r in rows if r["workload"] == workload]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in zip(axes, ("mean_jct", "p99_jct", "mean_ttft"),
                              ("mean JCT", "p99 JCT", "mean TTFT")):
        for router in dict.fromkeys(router_label(r) for r in group):
            points = sorted((r["rate"], r[key]) for r in group
                            if router_label(r) == router and r[key] is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=router)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("seconds")
        ax.set_title(f"{workload}: {title}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_reports(out: Path, workload: str, rows: list[dict]) -> list[dict]:
    everything = merge_rows(out / "strategies.json", workload, rows)
    write_report(out, "strategies", everything, markdown(everything))
    plot(everything, workload, out / f"strategies_{workload}.png")
    return everything


# ---- the command -------------------------------------------------------------------------------
def say(message: str) -> None:
    print(f"mpiserve bench: {message}", file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="long",
                        help="long (~2000 in, ~32 out), chat (~200 in, ~128 out), "
                             "shared_prefix (1500 shared + ~100 own, ~32 out)")
    parser.add_argument("--routers", help="comma list; balanced_pd:0.1 or balanced_pd:auto sets "
                        f"decode_fraction (default {DEFAULT_ROUTERS}; quick: {QUICK_ROUTERS})")
    parser.add_argument("--rates", help="comma list of request rates, requests/s "
                        "(default: the workload's)")
    parser.add_argument("--num-requests", type=int, help="requests per run "
                        "(default: the workload's)")
    parser.add_argument("--model", help="checkpoint directory (default: the benchmark model, "
                        "built into the mpiserve cache on first use)")
    parser.add_argument("--prefill", type=int, default=1, help="prefill engines (default 1)")
    parser.add_argument("--decode", type=int, default=1, help="decode engines (default 1)")
    parser.add_argument("--slo-ttft", type=float, help="TTFT SLO in seconds for goodput "
                        "(default: the workload's)")
    parser.add_argument("--slo-tpot", type=float, help="TPOT SLO in seconds for goodput "
                        "(default: the workload's)")
    parser.add_argument("--seed", type=int, default=SEED, help="workload seed")
    parser.add_argument("--out", default="results", help="output directory (default results)")
    parser.add_argument("--work-dir", help="keep the runs' inputs, outputs and logs here "
                        "(default: a temporary directory, removed unless a run failed)")
    parser.add_argument("--run-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for every `mpiserve run`, e.g. "
                             "--run-arg=--kv-cache-gib=1 (repeatable)")
    parser.add_argument("--run-timeout", type=float, help="seconds before a run is stopped "
                        "(default: last arrival + 30 min)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model and workload, seconds long (a smoke test, not a "
                             "measurement)")


def run_bench(args, argv: list[str] | None = None) -> int:
    if args.prefill < 0 or args.decode < 0 or args.prefill + args.decode < 1:
        say("--prefill and --decode must be >= 0 with at least one engine")
        return 2
    if args.num_requests is not None and args.num_requests < 1:
        say("--num-requests must be at least 1")
        return 2
    try:
        parse_routers(args.routers or DEFAULT_ROUTERS)
        if args.rates:
            parse_rates(args.rates)
    except ValueError as exc:
        say(f"error: {exc}")
        return 2
    workload = (QUICK_WORKLOADS if args.quick else WORKLOADS)[args.workload]
    command = "mpiserve bench" + ("" if not argv else " " + shlex.join(argv))
    rows, failures = bench_workload(args, workload, command)
    write_reports(Path(args.out), workload.name, rows)
    say(f"wrote {Path(args.out) / 'strategies.json'}, strategies.md and "
        f"strategies_{workload.name}.png")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpiserve bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    return run_bench(parser.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
